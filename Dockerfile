# Gantry's container images: `gantry-server` and `gantry-runner`, each `FROM scratch` with one
# statically linked binary (glibc, crt-static), running as the non-root user 65532.
#
# The binaries are built outside the image, so no base image has to be pulled from a registry:
# `scripts/images.sh` builds them and runs `docker build` on a context holding only them.
#
#   scripts/images.sh                                  # gantry-server:VERSION, gantry-runner:VERSION
#   GANTRY_IMAGE_PREFIX=registry.example.com/gantry/ scripts/images.sh --push
#
# The context this file expects: gantry-server, gantry-runner, gantry (executables), and two
# empty directories, data/ and state/.

FROM scratch AS server
COPY gantry-server /usr/local/bin/gantry-server
# The SQLite database lives here by default: mount a volume (the Helm chart mounts a
# PersistentVolumeClaim). PostgreSQL is chosen with GANTRY_DATABASE_URL=postgres://…
COPY --chown=65532:65532 data/ /var/lib/gantry/
ENV GANTRY_LISTEN=0.0.0.0:50051 \
    GANTRY_DATABASE_URL=sqlite:///var/lib/gantry/gantry.db?mode=rwc
EXPOSE 50051
USER 65532:65532
WORKDIR /var/lib/gantry
ENTRYPOINT ["/usr/local/bin/gantry-server"]

FROM scratch AS runner
COPY gantry-runner /usr/local/bin/gantry-runner
# The static `gantry` CLI beside the runner: the runner mounts it read-only into every job
# container at /usr/local/bin/gantry, so the code inside any image can call `gantry job …`.
COPY gantry /usr/local/bin/gantry
# The runner's identity (runner.json) is kept here: a volume keeps it across restarts.
COPY --chown=65532:65532 state/ /var/lib/gantry-runner/
# Jobs run in containers on the Docker engine behind DOCKER_HOST (default: the mounted
# /var/run/docker.sock); the image has no shell or tools for process jobs.
ENV GANTRY_RUNNER_STATE_DIR=/var/lib/gantry-runner \
    GANTRY_RUNNER_EXECUTORS=docker
USER 65532:65532
WORKDIR /var/lib/gantry-runner
ENTRYPOINT ["/usr/local/bin/gantry-runner"]
