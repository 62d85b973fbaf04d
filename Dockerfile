# One image for the sidecar, the operator, migrations and the CLI: `billingproxy <command>`.
# Envoy is not in it: the gateway pod runs the official Envoy image beside it
# (docs/decisions/0023-one-image-and-the-official-envoy.md). Build with `make image`.

ARG PYTHON_VERSION=3.11

# --- build: a virtual environment with the project and its runtime dependencies only -----------
FROM python:${PYTHON_VERSION}-slim AS build
# The Makefile passes its pinned version: the price map is data we read, never code we import.
ARG LITELLM_VERSION
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/billingproxy
WORKDIR /src
COPY pyproject.toml README.md ./
COPY billing billing
COPY billing_stripe billing_stripe
COPY authz_sidecar authz_sidecar
COPY billingproxy billingproxy
COPY operator operator
# No extras: the devstack (embedded PostgreSQL, the Envoy wheel) and the test tools stay out.
RUN /opt/billingproxy/bin/pip install . \
 && /opt/billingproxy/bin/pip install --no-deps "litellm==${LITELLM_VERSION:?pass --build-arg LITELLM_VERSION (make image does)}" \
 && /opt/billingproxy/bin/pip uninstall --yes pip setuptools wheel \
 && find /opt/billingproxy -name '__pycache__' -prune -exec rm -rf {} +
# pip's bytecode goes: the last stage compiles its own (below), and the dev stage writes it as
# Tilt syncs the sources.

# --- dev: Tilt's image on kind only (`make image` builds the last stage, never this one) ---------
# The build stage's environment, runnable like the final image, with the installed packages owned
# by the pod's user so that Tilt's live_update can sync Python files into them
# (docs/decisions/0027-tilt-on-kind.md). No devstack extra here either: the demo backend and the
# Stripe double are modules of the package with its core dependencies.
FROM build AS dev
ENV PATH=/opt/billingproxy/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    BILLINGPROXY_DATA_DIR=/var/lib/billingproxy \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
RUN chown -R 65532:65532 /opt/billingproxy/lib \
 && mkdir -p /var/lib/billingproxy && chown 65532:65532 /var/lib/billingproxy
WORKDIR /var/lib/billingproxy
USER 65532:65532
ENTRYPOINT ["billingproxy"]

# --- run: the slim base, the environment, a numeric non-root user -----------------------------
FROM python:${PYTHON_VERSION}-slim
COPY --from=build /opt/billingproxy /opt/billingproxy
# Bytecode compiled once, here, for the environment and the standard library (the base image ships
# none): the root filesystem may be read-only, and every exec probe is a Python start that would
# otherwise compile each module it imports, every time. Unchecked hashes, because the sources never
# change in an image and a timestamp check would depend on mtimes a COPY may not keep
# (docs/decisions/0022-exec-probes.md).
RUN python -m compileall -q -j 0 --invalidation-mode unchecked-hash \
      /opt/billingproxy/lib "$(python -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')"
# No bytecode written next to the sources at run time, no caches, and the only writable path is the
# declared volume.
ENV PATH=/opt/billingproxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BILLINGPROXY_DATA_DIR=/var/lib/billingproxy \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
RUN mkdir -p /var/lib/billingproxy && chown 65532:65532 /var/lib/billingproxy
VOLUME ["/var/lib/billingproxy"]
WORKDIR /var/lib/billingproxy
USER 65532:65532
ENTRYPOINT ["billingproxy"]
CMD ["--help"]
