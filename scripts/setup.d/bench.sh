# Sourced by scripts/setup.sh: what `make bench` needs. Installs only what is
# missing. h2load (Debian nghttp2-client) generates the load: a C HTTP/2
# client, so the load side stays cheaper than the Envoy it measures.
apt_install nghttp2-client
