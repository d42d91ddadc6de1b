# ktel image: a static binary (the BPF objects are embedded by bpf2go) on a
# minimal base. Build: docker build --build-arg VERSION=$(git describe --tags --always) \
#   --build-arg REVISION=$(git rev-parse --short HEAD) -t ghcr.io/ktel-dev/ktel:VERSION .
# test/deploy builds the binary with this file's `go build` line and checks
# that it is static and runs.

ARG GO_VERSION=1.26.8

FROM golang:${GO_VERSION}-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/root/go/pkg/mod go mod download
COPY . .
ARG VERSION=dev
ARG REVISION=unknown
# The generated BPF objects are committed: no clang needed. CGO off: a
# static binary, no libc in the image.
RUN --mount=type=cache,target=/root/go/pkg/mod --mount=type=cache,target=/root/.cache/go-build \
    CGO_ENABLED=0 GOOS=linux go build -trimpath -buildvcs=false -ldflags="-s -w -X github.com/ktel-dev/ktel/internal/version.Version=${VERSION} -X github.com/ktel-dev/ktel/internal/version.Revision=${REVISION}" -o /out/ktel ./cmd/ktel

# distroless/static: CA certificates (OTLP over TLS), tzdata, /etc/passwd;
# no shell, no package manager. Pin by digest in your registry mirror.
FROM gcr.io/distroless/static-debian12
COPY --from=build /out/ktel /usr/bin/ktel
# uid 0, deliberately: loading BPF needs CAP_BPF and CAP_PERFMON in the
# effective set, and for a non-root uid neither Docker nor Kubernetes can put
# them there (no ambient capabilities; execve clears them). Run it with every
# capability dropped but those ktel needs, e.g.
#   docker run --cap-drop ALL --cap-add BPF --cap-add PERFMON --cap-add NET_ADMIN \
#     --read-only -v /sys/kernel/btf:/sys/kernel/btf:ro -p 9437:9437 IMAGE
# (deploy/kubernetes does the same).
USER 0:0
EXPOSE 9437
ENTRYPOINT ["/usr/bin/ktel"]
