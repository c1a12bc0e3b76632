#!/usr/bin/env bash
# A *signed* query with kcat, sha256sum and openssl: what a client in any language does when
# the worker runs with LOOKALIKE_QUERY_AUTH=1 (docs/security.md).
#
#   usage: LOOKALIKE_CLIENT_ID=shop-1 LOOKALIKE_CLIENT_KEY=... docs/examples/signed-query-with-kcat.sh IMAGE [REQUEST_ID]
#   KCAT_OPTS: extra kcat options, e.g. for SASL_SSL:
#     KCAT_OPTS="-X security.protocol=SASL_SSL -X sasl.mechanisms=SCRAM-SHA-512 -X sasl.username=shop
#                -X sasl.password=... -X ssl.ca.location=ca.pem"
#   prints the reply JSON and exits 0, or exits 1 after 30 s.
set -euo pipefail

BOOTSTRAP=${LOOKALIKE_KAFKA_BOOTSTRAP:-127.0.0.1:19092}
QUERIES=${LOOKALIKE_QUERIES_TOPIC:-lookalike.queries}
REPLIES=${LOOKALIKE_REPLIES_TOPIC:-lookalike.replies}
CLIENT_ID=${LOOKALIKE_CLIENT_ID:?set LOOKALIKE_CLIENT_ID}
CLIENT_KEY=${LOOKALIKE_CLIENT_KEY:?set LOOKALIKE_CLIENT_KEY}
IMAGE=$1
REQUEST_ID=${2:-req-$(date +%s%N)}
read -r -a KCAT_EXTRA <<< "${KCAT_OPTS:-}"

since=$(( $(date +%s%3N) - 1000 ))
timestamp=$(date +%s%3N)
image_sha256=$(sha256sum "$IMAGE" | cut -d' ' -f1)

# The canonical request: netstrings (<byte length>:<bytes>,) of the scheme, the key, every
# header but `signature` as name then value, sorted by name (client-id < k < reply-to <
# timestamp-ms), and the image's SHA-256 in hex; nothing between them.
export LC_ALL=C  # ${#x} counts bytes
ns() { printf '%d:%s,' "${#1}" "$1"; }
canonical=$(ns LOOKALIKE-HMAC-SHA256-V2; ns "$REQUEST_ID"; ns client-id; ns "$CLIENT_ID"; ns k; ns 5;
            ns reply-to; ns "$REPLIES"; ns timestamp-ms; ns "$timestamp"; ns "$image_sha256")
signature=$(printf '%s' "$canonical" | openssl dgst -sha256 -hmac "$CLIENT_KEY" -r | cut -d' ' -f1)

kcat -P -b "$BOOTSTRAP" "${KCAT_EXTRA[@]}" -t "$QUERIES" -X message.max.bytes=9000000 -k "$REQUEST_ID" \
     -H "client-id=$CLIENT_ID" -H "k=5" -H "reply-to=$REPLIES" -H "timestamp-ms=$timestamp" \
     -H "signature=$signature" "$IMAGE"

for _ in $(seq 1 150); do
  reply=$(kcat -C -b "$BOOTSTRAP" "${KCAT_EXTRA[@]}" -t "$REPLIES" -o "s@$since" -e -q -f '%k\t%s\n' \
          | awk -F'\t' -v id="$REQUEST_ID" '$1 == id { print $2; exit }')
  if [ -n "$reply" ]; then
    echo "$reply"
    exit 0
  fi
  sleep 0.2
done
echo "no reply for request $REQUEST_ID within 30 s" >&2
exit 1
