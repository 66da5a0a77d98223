#!/usr/bin/env bash
# Debian packages the test suite runs for real: redis-server (store tests start their own
# instances on free ports), tshark (Wireshark's Diameter dissector checks our answers) and
# promtool from prometheus (checks deploy/prometheus rules and runs their unit tests), curl (an
# HTTP/2 prior-knowledge client for the N5g-eir tests), and Erlang/OTP's diameter application
# (an independent MME for the live interop tests; erlang-dev carries the headers its generated
# dictionary codec is compiled against); h2load from nghttp2-client for the N5g-eir benchmark
# (the suite's smoke test runs it).
set -euo pipefail
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v tshark >/dev/null 2>&1 || missing+=(tshark)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)  # TLS tests make their own PKI
command -v curl >/dev/null 2>&1 || missing+=(curl)  # an independent HTTP/2 client (N5g-eir)
command -v erlc >/dev/null 2>&1 || missing+=(erlang-base)
command -v h2load >/dev/null 2>&1 || missing+=(nghttp2-client)  # N5g-eir benchmark (h2load)
ls /usr/lib/erlang/lib/diameter-*/bin/diameterc >/dev/null 2>&1 || missing+=(erlang-diameter)
ls /usr/lib/erlang/lib/diameter-*/include/diameter.hrl >/dev/null 2>&1 || missing+=(erlang-dev)
# make test-compiled: mypyc's C output needs a compiler and the headers of the Python it builds for
command -v gcc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
inc=$(${PYTHON:-python3} -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
[ -e "$inc/Python.h" ] || missing+=(python3-dev)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  SUDO=sudo
else
  SUDO=
fi
echo "installing ${missing[*]} (apt)" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
  "${missing[@]}" >/dev/null
