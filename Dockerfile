# One image for every role of the docker-compose lab (router, node, backend, client): the same
# FRR, BPF toolchain and maglev-lb as `maglev lab` uses on a host. See docker-compose.yml.
FROM debian:bookworm-slim

# Same system packages as the Makefile's APT_PACKAGES, plus Python and curl for the client.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      python3 python3-venv python3-dev gcc clang llvm libbpf-dev bpftool iproute2 ethtool \
      tcpdump iputils-ping frr procps curl ca-certificates etcd-server etcd-client \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/maglev-lb
COPY . /opt/maglev-lb
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir -q --upgrade pip setuptools wheel \
 && /opt/venv/bin/pip install --no-cache-dir -q -e . \
 && /opt/venv/bin/python -m node.forwarder.build
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1

COPY docker/entrypoint.sh /usr/local/bin/maglev-entrypoint
ENTRYPOINT ["maglev-entrypoint"]
