package validate

import (
	"fmt"
	"strings"
	"testing"

	"github.com/pelletier/go-toml/v2"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
)

// TestSnapshotterMetricsOnly: the snapshotter's only TCP listener is its
// metrics address, on the node's address (not loopback, which Prometheus
// cannot reach) at the port the named containerPort "metrics" and the
// prometheus.io annotations give; the container exposes no other port; the
// ConfigMap does not set metrics_address besides the flag; and the status
// and snapshots sockets stay in the host's /run/lazybase.
func TestSnapshotterMetricsOnly(t *testing.T) {
	var ds *appsv1.DaemonSet
	var cm *corev1.ConfigMap
	for _, o := range decodeAll(t) {
		switch v := o.obj.(type) {
		case *appsv1.DaemonSet:
			if v.Name == "lazybase-snapshotter" {
				ds = v
			}
		case *corev1.ConfigMap:
			if v.Name == "lazybase-snapshotter" {
				cm = v
			}
		}
	}
	if ds == nil || cm == nil {
		t.Fatal("DaemonSet or ConfigMap lazybase-snapshotter missing")
	}
	spec := ds.Spec.Template.Spec
	var snap *corev1.Container
	for i := range spec.Containers {
		if spec.Containers[i].Name == "snapshotter" {
			snap = &spec.Containers[i]
		}
	}
	if snap == nil {
		t.Fatal("no container named snapshotter")
	}
	if len(snap.Ports) != 1 || snap.Ports[0].Name != "metrics" {
		t.Fatalf("snapshotter ports %+v: want exactly one, named metrics", snap.Ports)
	}
	port := snap.Ports[0].ContainerPort
	if spec.HostNetwork && snap.Ports[0].HostPort != port {
		t.Errorf("hostPort %d != containerPort %d on the host network", snap.Ports[0].HostPort, port)
	}
	wantArg := fmt.Sprintf("--metrics-address=[$(POD_IP)]:%d", port)
	found := false
	for _, a := range snap.Args {
		if strings.HasPrefix(a, "--metrics-address") {
			if a != wantArg {
				t.Errorf("arg %q, want %q", a, wantArg)
			}
			found = true
		}
	}
	if !found {
		t.Errorf("no %s among args %q", wantArg, snap.Args)
	}
	podIP := false
	for _, e := range snap.Env {
		if e.Name == "POD_IP" && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "status.podIP" {
			podIP = true
		}
	}
	if !podIP {
		t.Error("no POD_IP from status.podIP")
	}
	ann := ds.Spec.Template.Annotations
	if ann["prometheus.io/scrape"] != "true" || ann["prometheus.io/port"] != fmt.Sprint(port) || ann["prometheus.io/path"] != "/metrics" {
		t.Errorf("prometheus annotations %v: want scrape true, port %d, path /metrics", ann, port)
	}
	var daemon map[string]any
	if err := toml.Unmarshal([]byte(cm.Data["snapshotter.toml"]), &daemon); err != nil {
		t.Fatalf("snapshotter.toml: %v", err)
	}
	if v, ok := daemon["metrics_address"]; ok {
		t.Errorf("snapshotter.toml sets metrics_address = %v; the DaemonSet's --metrics-address is the one place", v)
	}
	for _, k := range []string{"socket", "status_socket"} {
		if s, ok := daemon[k].(string); ok && !strings.HasPrefix(s, "/run/lazybase/") {
			t.Errorf("%s %q is not under the host's /run/lazybase", k, s)
		}
	}
	hostRun := false
	for _, v := range spec.Volumes {
		if v.HostPath != nil && v.HostPath.Path == "/run/lazybase" {
			hostRun = true
		}
	}
	if !hostRun {
		t.Error("/run/lazybase is not a hostPath volume")
	}
}
