"""The Kubernetes Container Runtime Interface (runtime.v1) over the daemon's cells.

`pods` keeps the CRI's pod sandboxes and containers and drives them through the runtime
(Workloads, Containers, the image store); `logs` writes container output in the CRI log format
kubelet reads; `service` translates the vendored runtime.v1 messages (`generated`, from
third_party/cri-api) to and from them; `server` serves RuntimeService and ImageService on a
plaintext Unix socket of mode 0600, as kubelet expects.
"""
