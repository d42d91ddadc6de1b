// Package cgroups maps cgroup v2 ids (what BPF programs read with
// bpf_get_current_cgroup_id) to cgroup paths, and cgroup paths to the
// workload they belong to: a Kubernetes pod and container, a container of
// another runtime, or a systemd unit.
package cgroups

import (
	"strings"
)

// Workload is what a cgroup path says about the processes in it.
type Workload struct {
	// PodUID is the Kubernetes pod's UID (with dashes), when the path is
	// below a kubepods cgroup; QoS is its class: guaranteed, burstable or
	// besteffort.
	PodUID string
	QoS    string
	// ContainerID is the container's id as the runtime reports it (the id
	// in a pod's containerStatuses[].containerID after "<runtime>://"), and
	// Runtime the runtime that named the cgroup: containerd, crio, docker,
	// or "" for kubelet's cgroupfs driver, whose container cgroups are the
	// bare id. Empty for a pod's own cgroup.
	ContainerID string
	Runtime     string
	// Unit is the innermost systemd unit (foo.service, session-3.scope)
	// or, for a path with no unit, the path itself; it is set only off
	// Kubernetes and outside containers.
	Unit string
}

// Kube reports whether the path was a Kubernetes pod's or one of its
// containers'.
func (w Workload) Kube() bool { return w.PodUID != "" }

// ParsePath reads a cgroup path relative to the cgroup v2 root ("/" or
// "/kubepods.slice/..."). It knows kubelet's systemd and cgroupfs drivers,
// kubepods nested below other cgroups (kind, or kubelet in a systemd
// slice), containerd, CRI-O (and crun's "container" child cgroup) and
// Docker. The innermost container wins: a pod in a kind node, itself a
// Docker container, is the pod's.
func ParsePath(path string) Workload {
	var w Workload
	parts := strings.Split(strings.Trim(path, "/"), "/")
	kube := -1 // index of the kubepods component
	for i, p := range parts {
		if p == "" {
			continue
		}
		if isKubepods(p) {
			kube = i
			w = Workload{}
			continue
		}
		if kube >= 0 {
			if qos, ok := qosOf(p); ok && w.PodUID == "" && w.ContainerID == "" {
				w.QoS = qos
				continue
			}
			if uid, ok := podUIDOf(p); ok && w.ContainerID == "" {
				w.PodUID = uid
				if w.QoS == "" {
					w.QoS = "guaranteed"
				}
				continue
			}
		}
		id, rt, ok := containerOf(p)
		if !ok && i > 0 && parts[i-1] == "docker" && isHexID(p) {
			// Docker's cgroupfs driver: /docker/<id>.
			id, rt, ok = p, "docker", true
		}
		if ok {
			if kube < 0 || w.PodUID == "" {
				// A container outside any pod: Docker on the host, or the
				// kind node that kubepods below it belong to.
				w = Workload{ContainerID: id, Runtime: rt}
				kube = -1
			} else {
				w.ContainerID, w.Runtime = id, rt
			}
			continue
		}
		if kube >= 0 && w.PodUID != "" && w.ContainerID == "" && isHexID(p) {
			// cgroupfs driver: the container's cgroup is its bare id.
			w.ContainerID, w.Runtime = p, ""
			continue
		}
		// Anything else below a container (crun's "container", a
		// workload's own children) stays the container's.
	}
	if w.PodUID == "" && w.ContainerID == "" {
		w = Workload{Unit: unitOf(parts)}
	}
	return w
}

// isKubepods matches kubelet's top cgroup: kubepods (cgroupfs),
// kubepods.slice, and the same nested in a slice (kubelet-kubepods.slice,
// as kind names it).
func isKubepods(p string) bool {
	return p == "kubepods" || p == "kubepods.slice" || strings.HasSuffix(p, "-kubepods.slice")
}

// qosOf matches a QoS class cgroup: burstable (cgroupfs),
// kubepods-burstable.slice (systemd).
func qosOf(p string) (string, bool) {
	name := strings.TrimSuffix(p, ".slice")
	for _, q := range []string{"burstable", "besteffort"} {
		if name == q || strings.HasSuffix(name, "kubepods-"+q) {
			return q, true
		}
	}
	return "", false
}

// podUIDOf matches a pod cgroup: pod<uid> (cgroupfs, dashes) or
// kubepods-[qos-]pod<uid>.slice (systemd, dashes escaped as underscores).
func podUIDOf(p string) (string, bool) {
	var uid string
	if name, ok := strings.CutSuffix(p, ".slice"); ok {
		i := strings.LastIndex(name, "-pod")
		if i < 0 || !strings.Contains(name[:i], "kubepods") {
			return "", false
		}
		uid = strings.ReplaceAll(name[i+len("-pod"):], "_", "-")
	} else if rest, ok := strings.CutPrefix(p, "pod"); ok {
		uid = rest
	} else {
		return "", false
	}
	if !isUID(uid) {
		return "", false
	}
	return uid, true
}

// isUID accepts a pod UID: hex digits and dashes, RFC 4122 length (static
// pods' UIDs are a hash in the same form).
func isUID(s string) bool {
	if len(s) != 36 {
		return false
	}
	for i := range len(s) {
		c := s[i]
		switch {
		case i == 8 || i == 13 || i == 18 || i == 23:
			if c != '-' {
				return false
			}
		case !isHex(c):
			return false
		}
	}
	return true
}

// containerOf matches a runtime's container cgroup: cri-containerd-<id>.scope,
// crio-<id>.scope, crio-conmon-<id>.scope (the container's monitor),
// docker-<id>.scope (Docker, cri-dockerd) and libpod-<id>.scope (Podman).
// Docker's cgroupfs layout (/docker/<id>) is the caller's.
func containerOf(p string) (id, runtime string, ok bool) {
	name, scope := strings.CutSuffix(p, ".scope")
	if !scope {
		return "", "", false
	}
	for _, rt := range []struct{ prefix, name string }{
		{"cri-containerd-", "containerd"},
		{"crio-conmon-", "crio"},
		{"crio-", "crio"},
		{"docker-", "docker"},
		{"libpod-", "podman"},
	} {
		if id, ok := strings.CutPrefix(name, rt.prefix); ok && isHexID(id) {
			return id, rt.name, true
		}
	}
	return "", "", false
}

// isHexID accepts a container id: 64 hex digits (containerd, CRI-O,
// Docker all use sha256-sized ids).
func isHexID(s string) bool {
	if len(s) != 64 {
		return false
	}
	for i := range len(s) {
		if !isHex(s[i]) {
			return false
		}
	}
	return true
}

func isHex(c byte) bool { return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' }

// unitOf is the innermost systemd unit of a path outside containers, or
// the path itself when it names none (a cgroup made by hand).
func unitOf(parts []string) string {
	for i := len(parts) - 1; i >= 0; i-- {
		p := parts[i]
		if strings.HasSuffix(p, ".service") || strings.HasSuffix(p, ".scope") {
			return p
		}
	}
	for i := len(parts) - 1; i >= 0; i-- {
		if strings.HasSuffix(parts[i], ".slice") {
			return parts[i]
		}
	}
	return "/" + strings.Join(parts, "/")
}
