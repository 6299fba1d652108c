#!/bin/sh
# Regenerates the test certificates (valid for 100 years): a CA, a server certificate for
# localhost/127.0.0.1 signed by it, a client certificate (CN=alice) signed by it, and a second,
# unrelated CA with a client certificate (CN=mallory) that the first CA does not vouch for, and a client
# certificate the first CA signed whose subject has no CN.
set -eu
cd "$(dirname "$0")"
days=36500
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days $days -subj "/CN=shardmq test CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj "/CN=localhost" 2>/dev/null
printf "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n" > server.ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days $days -extfile server.ext 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout client.key -out client.csr -subj "/O=shardmq tests/CN=alice" 2>/dev/null
printf "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n" > client.ext
openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out client.pem -days $days -extfile client.ext 2>/dev/null
openssl req -x509 -newkey rsa:2048 -nodes -keyout other-ca.key -out other-ca.pem -days $days -subj "/CN=other CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout mallory.key -out mallory.csr -subj "/CN=mallory" 2>/dev/null
openssl x509 -req -in mallory.csr -CA other-ca.pem -CAkey other-ca.key -CAcreateserial -out mallory.pem -days $days -extfile client.ext 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout nocn.key -out nocn.csr -subj "/O=shardmq tests/OU=no common name" 2>/dev/null
openssl x509 -req -in nocn.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out nocn.pem -days $days -extfile client.ext 2>/dev/null
# Test keys, not secrets: readable by a broker that drops root privileges (Mosquitto runs as its own user).
chmod 644 ./*.key
rm -f ./*.csr ./*.ext ./*.srl other-ca.key
