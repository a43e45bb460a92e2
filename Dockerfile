# vmm-tierd in a container. Build: docker build -t vmm-tierd .
#
# Run (the embedded default: a 1 GiB guest region, metrics on the container's loopback):
#   docker run --rm --device /dev/userfaultfd vmm-tierd
# With a config and the metrics port published (set metrics_listen = "0.0.0.0:9187" in
# the config so the port is reachable from outside the container's network namespace):
#   docker run --rm --device /dev/userfaultfd -p 127.0.0.1:9187:9187 \
#     -v /etc/vmm-tierd/vm1.toml:/etc/vmm-tierd/vmm-tierd.toml:ro \
#     -v vmm-tierd-state:/var/lib/vmm-tierd \
#     vmm-tierd run --config /etc/vmm-tierd/vmm-tierd.toml
#
# What userfaultfd needs:
# - Linux >= 6.8 on the host (WP_ASYNC, UFFDIO_MOVE, POISON; 7.3+ adds RWP).
# - --device /dev/userfaultfd. The container runs as root and the device is root-only
#   (0600) on the host, so no capability is needed. Without the device the syscall
#   userfaultfd(2) is used instead, which for KVM (kernel-mode) faults needs CAP_SYS_PTRACE
#   unless the host sets vm.unprivileged_userfaultfd=1; Docker's default seccomp profile
#   also blocks that syscall. The device is the simple, precise way.
# - --device /dev/kvm only when the guest regions back KVM guests.
# - No --privileged, no SYS_PTRACE, no SYS_ADMIN with the device.
# Guest memory lives in this process: `docker stop` sends SIGTERM and the daemon brings
# every evicted page back before exiting (daemon.shutdown_deadline, default 10s); give
# docker at least that long (--stop-timeout 30).
FROM python:3.11-slim

# gcc and headers build the cffi extension (vmm_tierd._native) at install time
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY native ./native
COPY vmm_tierd ./vmm_tierd
RUN pip install --no-cache-dir . \
 && apt-get purge -y gcc libc6-dev && apt-get autoremove -y \
 && rm -rf /src

# the store (guest memory, 0700) defaults to $XDG_STATE_HOME/vmm-tierd/store
ENV XDG_STATE_HOME=/var/lib
VOLUME /var/lib/vmm-tierd
WORKDIR /
EXPOSE 9187
STOPSIGNAL SIGTERM
ENTRYPOINT ["vmm-tierd"]
CMD ["run"]
