# cascadegw as a container: `make image` builds it (see README, "Containers").
#
# BASE is any Debian-bookworm image with Python 3.11 and venv; the default is the official
# slim one. Where no registry is reachable, `make image` makes a base with debootstrap and
# passes it as --build-arg BASE=localhost/cascadegw-base:bookworm.
ARG BASE=docker.io/library/python:3.11-slim-bookworm

# ---------------------------------------------------------------- build: a virtualenv
FROM ${BASE} AS build
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY gateway ./gateway
COPY adapters ./adapters
# A network behind a TLS-inspecting proxy passes its CA bundle as the build secret `pip_ca`
# (`make image` does, from the host's bundle); it is used for this step only, never stored.
RUN --mount=type=secret,id=pip_ca \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
    && python3 -m venv /opt/cascadegw \
    && /opt/cascadegw/bin/python -m pip install --no-cache-dir --quiet -c constraints.txt .

# ---------------------------------------------------------------- run: the venv, a user, a volume
FROM ${BASE}
COPY --from=build /opt/cascadegw /opt/cascadegw
RUN groupadd --gid 10001 cascadegw \
    && useradd --no-log-init --uid 10001 --gid cascadegw --home-dir /var/lib/cascadegw \
       --shell /usr/sbin/nologin cascadegw \
    && install -d -o cascadegw -g cascadegw -m 0700 /var/lib/cascadegw \
    && install -d -o cascadegw -g cascadegw -m 0750 /var/lib/cascadegw-simulators \
    && install -d -m 0755 /etc/cascadegw

# The journal and the tracking key live on the volume (store.data_dir); the config comes from
# a mounted file named by CASCADEGW_CONFIG (default: the built-in one, simulators on loopback),
# and every key can be overridden with CASCADEGW__SECTION__KEY, secrets included.
ENV PATH=/opt/cascadegw/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CASCADEGW__STORE__DATA_DIR=/var/lib/cascadegw
VOLUME ["/var/lib/cascadegw"]
USER 10001:10001
WORKDIR /var/lib/cascadegw

# ZeroMQ requests, ZeroMQ status events, HTTP admin (metrics, health, admin API: http.bind),
# HTTP public (webhooks, tracking links, health: http.public_bind)
EXPOSE 5555 5556 8080 8081

HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["cascadegw", "healthcheck"]

# `run` drains on SIGTERM: ingest stops, in-flight provider requests get --grace-seconds,
# staged journal writes are committed. Give `docker stop` more than that (-t 20).
STOPSIGNAL SIGTERM
ENTRYPOINT ["cascadegw"]
CMD ["run", "--grace-seconds", "10"]
