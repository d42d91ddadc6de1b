package cgroups

import (
	"errors"
	"strings"
	"testing"
)

func TestParsePath(t *testing.T) {
	const (
		id   = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
		id2  = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210"
		uid  = "5d3c1f2a-8b4e-4c6d-9e0f-1a2b3c4d5e6f"
		uidU = "5d3c1f2a_8b4e_4c6d_9e0f_1a2b3c4d5e6f"
	)
	for _, tc := range []struct {
		name, path string
		want       Workload
	}{
		{"systemd containerd burstable",
			"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + uidU + ".slice/cri-containerd-" + id + ".scope",
			Workload{PodUID: uid, QoS: "burstable", ContainerID: id, Runtime: "containerd"}},
		{"systemd containerd besteffort",
			"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + uidU + ".slice/cri-containerd-" + id + ".scope",
			Workload{PodUID: uid, QoS: "besteffort", ContainerID: id, Runtime: "containerd"}},
		{"systemd containerd guaranteed",
			"/kubepods.slice/kubepods-pod" + uidU + ".slice/cri-containerd-" + id + ".scope",
			Workload{PodUID: uid, QoS: "guaranteed", ContainerID: id, Runtime: "containerd"}},
		{"systemd pod cgroup",
			"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + uidU + ".slice",
			Workload{PodUID: uid, QoS: "burstable"}},
		{"systemd crio",
			"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + uidU + ".slice/crio-" + id + ".scope",
			Workload{PodUID: uid, QoS: "burstable", ContainerID: id, Runtime: "crio"}},
		{"systemd crio crun container child",
			"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + uidU + ".slice/crio-" + id + ".scope/container",
			Workload{PodUID: uid, QoS: "burstable", ContainerID: id, Runtime: "crio"}},
		{"systemd crio conmon",
			"/kubepods.slice/kubepods-pod" + uidU + ".slice/crio-conmon-" + id + ".scope",
			Workload{PodUID: uid, QoS: "guaranteed", ContainerID: id, Runtime: "crio"}},
		{"systemd cri-dockerd",
			"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + uidU + ".slice/docker-" + id + ".scope",
			Workload{PodUID: uid, QoS: "besteffort", ContainerID: id, Runtime: "docker"}},
		{"cgroupfs burstable",
			"/kubepods/burstable/pod" + uid + "/" + id,
			Workload{PodUID: uid, QoS: "burstable", ContainerID: id}},
		{"cgroupfs besteffort",
			"/kubepods/besteffort/pod" + uid + "/" + id,
			Workload{PodUID: uid, QoS: "besteffort", ContainerID: id}},
		{"cgroupfs guaranteed",
			"/kubepods/pod" + uid + "/" + id,
			Workload{PodUID: uid, QoS: "guaranteed", ContainerID: id}},
		{"cgroupfs workload child cgroup",
			"/kubepods/pod" + uid + "/" + id + "/app/worker",
			Workload{PodUID: uid, QoS: "guaranteed", ContainerID: id}},
		{"kind nested in kubelet.slice",
			"/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod" + uidU + ".slice/cri-containerd-" + id + ".scope",
			Workload{PodUID: uid, QoS: "burstable", ContainerID: id, Runtime: "containerd"}},
		{"kind node in docker",
			"/system.slice/docker-" + id2 + ".scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod" + uidU + ".slice/cri-containerd-" + id + ".scope",
			Workload{PodUID: uid, QoS: "guaranteed", ContainerID: id, Runtime: "containerd"}},
		{"kubepods under a test cgroup",
			"/ktel-test-1/kubepods/besteffort/pod" + uid + "/" + id,
			Workload{PodUID: uid, QoS: "besteffort", ContainerID: id}},
		{"docker systemd",
			"/system.slice/docker-" + id + ".scope",
			Workload{ContainerID: id, Runtime: "docker"}},
		{"docker cgroupfs",
			"/docker/" + id,
			Workload{ContainerID: id, Runtime: "docker"}},
		{"podman",
			"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-" + id + ".scope/container",
			Workload{ContainerID: id, Runtime: "podman"}},
		{"systemd service", "/system.slice/foo.service", Workload{Unit: "foo.service"}},
		{"redis", "/system.slice/redis-server.service", Workload{Unit: "redis-server.service"}},
		{"a service's own child cgroup", "/system.slice/foo.service/worker", Workload{Unit: "foo.service"}},
		{"unit below a test cgroup", "/ktel-test-1/ktel-test.slice/foo.service", Workload{Unit: "foo.service"}},
		{"hybrid root unit", "/init.scope", Workload{Unit: "init.scope"}},
		{"session scope", "/user.slice/user-1000.slice/session-3.scope", Workload{Unit: "session-3.scope"}},
		{"user service", "/user.slice/user-1000.slice/user@1000.service/app.slice/app-x.service", Workload{Unit: "app-x.service"}},
		{"slice", "/machine.slice", Workload{Unit: "machine.slice"}},
		{"root", "/", Workload{Unit: "/"}},
		{"hand-made", "/ktel-test-1/a", Workload{Unit: "/ktel-test-1/a"}},
		{"kubepods without a pod", "/kubepods.slice/kubepods-burstable.slice", Workload{Unit: "kubepods-burstable.slice"}},
		{"bad uid", "/kubepods/podnot-a-uid/" + id, Workload{Unit: "/kubepods/podnot-a-uid/" + id}},
		{"short id", "/kubepods.slice/kubepods-pod" + uidU + ".slice/cri-containerd-abc.scope",
			Workload{PodUID: uid, QoS: "guaranteed"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := ParsePath(tc.path); got != tc.want {
				t.Errorf("ParsePath(%q)\n got %+v\nwant %+v", tc.path, got, tc.want)
			}
		})
	}
}

func FuzzParsePath(f *testing.F) {
	f.Add("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod5d3c1f2a_8b4e_4c6d_9e0f_1a2b3c4d5e6f.slice")
	f.Add("/system.slice/foo.service")
	f.Fuzz(func(t *testing.T, path string) {
		w := ParsePath(path)
		if w.PodUID == "" && w.ContainerID == "" && w.Unit == "" {
			t.Errorf("ParsePath(%q): no workload", path)
		}
		// Callers slice container ids and trust pod UIDs' form.
		if w.ContainerID != "" && !isHexID(w.ContainerID) || w.PodUID != "" && !isUID(w.PodUID) {
			t.Errorf("ParsePath(%q) = %+v: malformed id", path, w)
		}
	})
}

func TestV2Mount(t *testing.T) {
	for _, tc := range []struct{ name, mountinfo, want string }{
		{"hybrid", `25 30 0:23 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
26 25 0:24 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
27 25 0:25 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
`, "/sys/fs/cgroup/unified"},
		{"unified", "35 24 0:30 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n", "/sys/fs/cgroup"},
		{"escaped", `35 24 0:30 / /mnt/my\040cgroup rw - cgroup2 cgroup2 rw` + "\n", "/mnt/my cgroup"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := v2Mount(strings.NewReader(tc.mountinfo))
			if err != nil || got != tc.want {
				t.Errorf("v2Mount = %q, %v; want %q", got, err, tc.want)
			}
		})
	}
	if _, err := v2Mount(strings.NewReader("27 25 0:25 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n")); !errors.Is(err, ErrNoV2) {
		t.Errorf("v1 only: err = %v, want ErrNoV2", err)
	}
}
