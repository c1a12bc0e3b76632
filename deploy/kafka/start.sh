#!/bin/sh
# The compose broker (docker-compose.yml): the configuration `lookalike secrets init` wrote
# into the kafka-secrets volume (SASL_SSL and mutual-TLS listeners only, the authorizer on),
# storage formatted on the first start, then the broker in the foreground. Nothing secret is
# on a command line: the keystore password is in server.properties (0600, this user's).
set -eu
conf=/secrets/server.properties
if [ ! -f /var/lib/kafka/data/meta.properties ]; then
  /opt/kafka/bin/kafka-storage.sh format --cluster-id "$(cat /secrets/cluster-id)" --config "$conf"
fi
exec /opt/kafka/bin/kafka-server-start.sh "$conf"
