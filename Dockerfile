# vmm-tierd in a container. Build: docker build -t vmm-tierd .
#
# Run (the embedded default: a 1 GiB guest region; metrics published on the host's
# loopback only):
#   docker run --rm --device /dev/userfaultfd --stop-timeout 40 \
#     -p 127.0.0.1:9187:9187 vmm-tierd
# With a config (keep --metrics-listen: a CMD given to `docker run` replaces the image's):
#   docker run --rm --device /dev/userfaultfd --stop-timeout 40 -p 127.0.0.1:9187:9187 \
#     -v /etc/vmm-tierd/vm1.toml:/etc/vmm-tierd/vmm-tierd.toml:ro \
#     -v vmm-tierd-state:/var/lib/vmm-tierd \
#     vmm-tierd run --config /etc/vmm-tierd/vmm-tierd.toml --metrics-listen 0.0.0.0:9187
#
# Tier a VM running on the host (attach): the daemon must see the VMM's process and
# trace it, so share the host's pid namespace and grant ptrace:
#   docker run --rm --pid=host --cap-add SYS_PTRACE --device /dev/userfaultfd \
#     --stop-timeout 70 -p 127.0.0.1:9187:9187 -v vmm-tierd-state:/var/lib/vmm-tierd \
#     vmm-tierd attach --pid "$(pidof qemu-system-x86_64)" --metrics-listen 0.0.0.0:9187
# (a detach brings every evicted page back into the VM first: give it the deadline.)
#
# Metrics: the image's command listens on 0.0.0.0:9187 on purpose. The container has its
# own network namespace, so its loopback (the daemon's default) is unreachable from
# outside and EXPOSE would do nothing; 0.0.0.0 inside it is reachable only through a
# published port (-p), which the run lines above bind to the host's loopback.
#
# What userfaultfd needs:
# - Linux >= 6.8 on the host (WP_ASYNC, UFFDIO_MOVE, POISON; 7.3+ adds RWP).
# - --device /dev/userfaultfd. The container runs as root and the device is root-only
#   (0600) on the host, so no capability is needed. Without the device the syscall
#   userfaultfd(2) is used instead, which for KVM (kernel-mode) faults needs CAP_SYS_PTRACE
#   unless the host sets vm.unprivileged_userfaultfd=1; Docker's default seccomp profile
#   also blocks that syscall. The device is the simple, precise way.
# - --device /dev/kvm only when the guest regions back KVM guests.
# - No --privileged, no SYS_ADMIN with the device; SYS_PTRACE (and --pid=host) only to
#   attach to a VMM outside the container.
#
# Stopping: guest memory lives in this process. `docker stop` sends SIGTERM and the
# daemon brings every evicted page back before exiting, within daemon.shutdown_deadline
# (30s in the embedded default, 10s unless a config file sets it) plus 5s of grace before
# it gives up. Docker's default 10s would SIGKILL it mid-restore: give it at least the
# deadline plus the grace, --stop-timeout 40 for the embedded default (and for any config
# whose shutdown_deadline is at most 35s).
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
# the metrics port, reachable only where `docker run -p` publishes it (see above)
EXPOSE 9187
STOPSIGNAL SIGTERM
ENTRYPOINT ["vmm-tierd"]
CMD ["run", "--metrics-listen", "0.0.0.0:9187"]
