#!/usr/bin/env bash
# Ask Lookalike for the products most similar to an image with kcat, a generic Kafka
# command-line client: no Lookalike code involved, only the topic contract.
#
#   usage: docs/examples/query-with-kcat.sh IMAGE [REQUEST_ID]
#   prints the reply JSON (see docs/contracts.md) and exits 0, or exits 1 after 30 s.
set -euo pipefail

BOOTSTRAP=${LOOKALIKE_KAFKA_BOOTSTRAP:-127.0.0.1:19092}
QUERIES=${LOOKALIKE_QUERIES_TOPIC:-lookalike.queries}
REPLIES=${LOOKALIKE_REPLIES_TOPIC:-lookalike.replies}
IMAGE=$1
REQUEST_ID=${2:-req-$(date +%s%N)}

# Remember "now" (a second early, for clock skew): the reply will be newer than this.
since=$(( $(date +%s%3N) - 1000 ))

# One file = one message. Key: the request id. Headers: where to reply and how many results.
kcat -P -b "$BOOTSTRAP" -t "$QUERIES" -X message.max.bytes=9000000 \
     -k "$REQUEST_ID" -H "reply-to=$REPLIES" -H "k=5" "$IMAGE"

# Read the reply topic from that timestamp to its end, until our key shows up.
for _ in $(seq 1 150); do
  reply=$(kcat -C -b "$BOOTSTRAP" -t "$REPLIES" -o "s@$since" -e -q -f '%k\t%s\n' \
          | awk -F'\t' -v id="$REQUEST_ID" '$1 == id { print $2; exit }')
  if [ -n "$reply" ]; then
    echo "$reply"
    exit 0
  fi
  sleep 0.2
done
echo "no reply for request $REQUEST_ID within 30 s" >&2
exit 1
