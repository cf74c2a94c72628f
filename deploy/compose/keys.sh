#!/usr/bin/env sh
# Print the variables deploy/compose.yaml needs: the gateway's CURVE secret key, one client key
# pair for tenant "demo", and an admin token. Keep the output out of version control.
#   deploy/compose/keys.sh > deploy/compose/.env
set -eu
cascadegw=${CASCADEGW:-cascadegw}
command -v "$cascadegw" >/dev/null 2>&1 || cascadegw="$(dirname "$0")/../../.venv/bin/cascadegw"
server=$("$cascadegw" keys generate --env)
client=$("$cascadegw" keys generate --env)
echo "# the gateway's keys (give clients CASCADEGW_SERVER_PUBLIC_KEY)"
echo "CASCADEGW_CURVE_SECRET_KEY=$(echo "$server" | sed -n 's/^secret=//p')"
echo "CASCADEGW_SERVER_PUBLIC_KEY=$(echo "$server" | sed -n 's/^public=//p')"
echo "# a client of tenant demo"
echo "CASCADEGW_CLIENT_PUBLIC_KEY=$(echo "$client" | sed -n 's/^public=//p')"
echo "CASCADEGW_CLIENT_SECRET_KEY=$(echo "$client" | sed -n 's/^secret=//p')"
echo "CASCADEGW_ADMIN_TOKEN=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')"
