#!/bin/sh
# A self-contained tapbox demo that needs no internet: in a throwaway network namespace it puts
# a toy web server on 192.0.2.10 (a documentation address), then runs two fetches under tapbox
# with one rule, `192.0.2.10:8000`. The first is allowed; the second (203.0.113.7) is refused
# at once and tapbox names it on stderr.
set -eu
exec unshare --map-root-user --net sh -eu -c '
ip link set lo up
ip addr add 192.0.2.10/32 dev lo
dir=$(mktemp -d) && echo "hello from the allowed server" > "$dir/index.html"
python3 -m http.server --bind 192.0.2.10 --directory "$dir" 8000 >/dev/null 2>&1 &
server=$!
trap "kill $server" EXIT
python3 -c "import socket,time
for _ in range(50):
    try: socket.create_connection((\"192.0.2.10\", 8000), 1).close(); break
    except OSError: time.sleep(0.1)"
fetch="import sys, urllib.request
try:
    print(\"  got:\", urllib.request.urlopen(sys.argv[1], timeout=5).read().decode().strip())
except OSError as e:
    print(\"  failed:\", getattr(e, \"reason\", e)); sys.exit(1)"
tapbox --allow 192.0.2.10:8000 -- sh -c "
  echo \"allowed: http://192.0.2.10:8000/\"; python3 -c \"\$0\" http://192.0.2.10:8000/
  echo \"denied:  http://203.0.113.7/\";     python3 -c \"\$0\" http://203.0.113.7/ || true
" "$fetch"
'
