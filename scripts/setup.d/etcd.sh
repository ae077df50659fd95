# The dedup store on etcd (`dedup.store: etcd`): the tests and the bench start
# their own 3-member etcd cluster on loopback from Debian's packages. The
# package's own service is not used (and not started where there is no init).
apt_install etcd-server etcd-client
