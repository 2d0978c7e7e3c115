# The agent server in a container, on Deno (default) or Bun:
#   docker build -t retell-agent .                        (Deno)
#   docker build --build-arg RUNTIME=bun -t retell-agent .  (Bun)
# The runtime is PID 1, so SIGTERM reaches the server and starts its drain.
ARG RUNTIME=deno

FROM denoland/deno:2.9.6 AS deno
WORKDIR /app
COPY package.json deno.json deno.lock main.ts fleet.ts ./
RUN deno install
USER deno
EXPOSE 8080
CMD ["deno", "run", "--allow-net", "--allow-env", "--allow-read", "--allow-write", "main.ts"]

FROM oven/bun:1.4.5 AS bun
WORKDIR /app
COPY package.json bun.lock main.ts fleet.ts ./
RUN bun install --frozen-lockfile --production
USER bun
EXPOSE 8080
CMD ["bun", "run", "main.ts"]

FROM ${RUNTIME}
