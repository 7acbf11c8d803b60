# jobstats-exporter: build a wheel in one stage, install it into a slim
# runtime that runs as a non-root user.
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY exporter ./exporter
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && pip wheel --no-cache-dir --wheel-dir /wheels /wheels/jobstats_exporter-*.whl

FROM python:3.11-slim-bookworm
COPY --from=build /wheels /wheels
# The wheels were resolved in the build stage; install exactly those, offline.
RUN pip install --no-cache-dir --no-index --find-links=/wheels /wheels/jobstats_exporter-*.whl \
 && rm -rf /wheels \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin jobstats
USER 10001
ENV JOBSTATS_WEB_LISTEN_ADDRESS=:9787 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
EXPOSE 9787
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["jobstats-exporter", "healthcheck"]
ENTRYPOINT ["jobstats-exporter"]
