package validate

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pelletier/go-toml/v2"
	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
)

const (
	manifestDir = ".."
	dropInPath  = "../../containerd/conf.d/lazybase-stargz.toml"
)

// object is one decoded manifest document.
type object struct {
	file string
	obj  runtime.Object
}

// decodeAll decodes every document of every *.yaml in deploy/kubernetes
// with a strict deserializer: a field the API type does not have, or a
// field given twice, is an error.
func decodeAll(t *testing.T) []object {
	t.Helper()
	scheme := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{corev1.AddToScheme, appsv1.AddToScheme, batchv1.AddToScheme} {
		if err := add(scheme); err != nil {
			t.Fatal(err)
		}
	}
	dec := serializer.NewCodecFactory(scheme, serializer.EnableStrict).UniversalDeserializer()
	files, err := filepath.Glob(filepath.Join(manifestDir, "*.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if len(files) == 0 {
		t.Fatalf("no manifests in %s", manifestDir)
	}
	var out []object
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(b)))
		for i := 0; ; i++ {
			doc, err := r.Read()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatalf("%s: document %d: %v", f, i, err)
			}
			if len(bytes.TrimSpace(stripComments(doc))) == 0 {
				continue
			}
			obj, gvk, err := dec.Decode(doc, nil, nil)
			if err != nil {
				t.Errorf("%s: document %d: %v", f, i, err)
				continue
			}
			t.Logf("%s: %s %s", filepath.Base(f), gvk.Kind, name(obj))
			out = append(out, object{file: filepath.Base(f), obj: obj})
		}
	}
	return out
}

func stripComments(doc []byte) []byte {
	var b bytes.Buffer
	for _, l := range strings.Split(string(doc), "\n") {
		if !strings.HasPrefix(strings.TrimSpace(l), "#") {
			b.WriteString(l + "\n")
		}
	}
	return b.Bytes()
}

func name(obj runtime.Object) string {
	if m, ok := obj.(interface{ GetName() string }); ok {
		return m.GetName()
	}
	return ""
}

// TestManifestsDecodeStrictly decodes every manifest and checks each
// workload's pod template.
func TestManifestsDecodeStrictly(t *testing.T) {
	objs := decodeAll(t)
	configMaps := map[string]bool{}
	for _, o := range objs {
		switch v := o.obj.(type) {
		case *corev1.ConfigMap:
			configMaps[v.Name] = true
		case *corev1.PersistentVolumeClaim:
			// Claims share the ConfigMaps' check: a volume must name one
			// the manifests define.
			configMaps["pvc/"+v.Name] = true
		}
	}
	kinds := map[string]int{}
	for _, o := range objs {
		var spec *corev1.PodSpec
		var podLabels map[string]string
		var selector map[string]string
		switch v := o.obj.(type) {
		case *appsv1.DaemonSet:
			kinds["DaemonSet"]++
			spec, podLabels, selector = &v.Spec.Template.Spec, v.Spec.Template.Labels, v.Spec.Selector.MatchLabels
		case *appsv1.Deployment:
			kinds["Deployment"]++
			spec, podLabels, selector = &v.Spec.Template.Spec, v.Spec.Template.Labels, v.Spec.Selector.MatchLabels
		case *batchv1.Job:
			kinds["Job"]++
			spec, podLabels = &v.Spec.Template.Spec, v.Spec.Template.Labels
		case *batchv1.CronJob:
			kinds["CronJob"]++
			spec, podLabels = &v.Spec.JobTemplate.Spec.Template.Spec, v.Spec.JobTemplate.Spec.Template.Labels
		case *corev1.ConfigMap:
			kinds["ConfigMap"]++
			continue
		case *corev1.PersistentVolumeClaim:
			kinds["PersistentVolumeClaim"]++
			continue
		case *corev1.Service:
			kinds["Service"]++
			if !labels.SelectorFromSet(v.Spec.Selector).Empty() && !anyPodMatches(objs, v.Spec.Selector) {
				t.Errorf("%s: Service %s selects no pod template: %v", o.file, v.Name, v.Spec.Selector)
			}
			continue
		default:
			t.Errorf("%s: unexpected %T", o.file, o.obj)
			continue
		}
		where := o.file + ": " + name(o.obj)
		if selector != nil && !labels.SelectorFromSet(selector).Matches(labels.Set(podLabels)) {
			t.Errorf("%s: selector %v does not match pod labels %v", where, selector, podLabels)
		}
		checkPodSpec(t, where, spec, configMaps)
	}
	for _, k := range []string{"DaemonSet", "CronJob", "Job", "ConfigMap"} {
		if kinds[k] == 0 {
			t.Errorf("no %s among the manifests (%v)", k, kinds)
		}
	}
}

func anyPodMatches(objs []object, sel map[string]string) bool {
	s := labels.SelectorFromSet(sel)
	for _, o := range objs {
		switch v := o.obj.(type) {
		case *appsv1.Deployment:
			if s.Matches(labels.Set(v.Spec.Template.Labels)) {
				return true
			}
		case *appsv1.DaemonSet:
			if s.Matches(labels.Set(v.Spec.Template.Labels)) {
				return true
			}
		}
	}
	return false
}

// checkPodSpec: every container has an image, every mount names a volume of
// the pod, and every ConfigMap volume names a ConfigMap of the manifests.
func checkPodSpec(t *testing.T, where string, spec *corev1.PodSpec, configMaps map[string]bool) {
	t.Helper()
	vols := map[string]corev1.Volume{}
	for _, v := range spec.Volumes {
		vols[v.Name] = v
		if v.ConfigMap != nil && !configMaps[v.ConfigMap.Name] {
			t.Errorf("%s: volume %s uses ConfigMap %q, which no manifest defines", where, v.Name, v.ConfigMap.Name)
		}
		if v.PersistentVolumeClaim != nil && !configMaps["pvc/"+v.PersistentVolumeClaim.ClaimName] {
			t.Errorf("%s: volume %s uses claim %q, which no manifest defines", where, v.Name, v.PersistentVolumeClaim.ClaimName)
		}
	}
	containers := append(append([]corev1.Container{}, spec.InitContainers...), spec.Containers...)
	if len(spec.Containers) == 0 {
		t.Errorf("%s: no containers", where)
	}
	for _, c := range containers {
		if c.Image == "" {
			t.Errorf("%s: container %s has no image", where, c.Name)
		}
		for _, m := range c.VolumeMounts {
			if _, ok := vols[m.Name]; !ok {
				t.Errorf("%s: container %s mounts unknown volume %q", where, c.Name, m.Name)
			}
		}
	}
}

// TestSnapshotterDaemonSet: the DaemonSet runs `lazybase snapshotter` with
// the ConfigMap's config, privileged, with /dev/fuse, the daemon's root on
// the host mounted Bidirectional (its FUSE mounts must reach the host's
// containerd) and its socket directory on the host; the ConfigMap carries
// the containerd drop-in byte for byte, and the daemon's root and socket
// are the drop-in's proxy plugin root and address.
func TestSnapshotterDaemonSet(t *testing.T) {
	objs := decodeAll(t)
	var ds *appsv1.DaemonSet
	var cm *corev1.ConfigMap
	for _, o := range objs {
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
		t.Fatalf("DaemonSet %v / ConfigMap %v lazybase-snapshotter missing", ds != nil, cm != nil)
	}
	if ds.Namespace != cm.Namespace {
		t.Errorf("DaemonSet in namespace %q, ConfigMap in %q", ds.Namespace, cm.Namespace)
	}

	dropIn, err := os.ReadFile(dropInPath)
	if err != nil {
		t.Fatal(err)
	}
	if got := cm.Data["lazybase-stargz.toml"]; got != string(dropIn) {
		t.Errorf("ConfigMap's lazybase-stargz.toml differs from %s:\n%s", dropInPath, got)
	}
	var plugin struct {
		ProxyPlugins map[string]struct {
			Address string            `toml:"address"`
			Exports map[string]string `toml:"exports"`
		} `toml:"proxy_plugins"`
	}
	if err := toml.Unmarshal(dropIn, &plugin); err != nil {
		t.Fatal(err)
	}
	stargz := plugin.ProxyPlugins["stargz"]
	var daemon struct {
		Root   string `toml:"root"`
		Socket string `toml:"socket"`
	}
	if err := toml.Unmarshal([]byte(cm.Data["snapshotter.toml"]), &daemon); err != nil {
		t.Fatalf("snapshotter.toml: %v", err)
	}
	if daemon.Root != stargz.Exports["root"] || daemon.Socket != stargz.Address {
		t.Errorf("snapshotter.toml root %q socket %q, drop-in root %q address %q",
			daemon.Root, daemon.Socket, stargz.Exports["root"], stargz.Address)
	}

	spec := ds.Spec.Template.Spec
	hostPaths := map[string]string{}
	for _, v := range spec.Volumes {
		if v.HostPath != nil {
			hostPaths[v.Name] = v.HostPath.Path
		}
	}
	var snap *corev1.Container
	for i := range spec.Containers {
		if spec.Containers[i].Name == "snapshotter" {
			snap = &spec.Containers[i]
		}
	}
	if snap == nil {
		t.Fatal("no container named snapshotter")
	}
	if len(snap.Args) < 2 || snap.Args[0] != "snapshotter" || !strings.HasPrefix(snap.Args[1], "--config=/etc/lazybase/") {
		t.Errorf("snapshotter args %q", snap.Args)
	}
	if snap.SecurityContext == nil || snap.SecurityContext.Privileged == nil || !*snap.SecurityContext.Privileged {
		t.Error("snapshotter container is not privileged (FUSE mounts)")
	}
	mounts := map[string]corev1.VolumeMount{}
	for _, m := range snap.VolumeMounts {
		mounts[m.MountPath] = m
	}
	rootDir := filepath.Dir(daemon.Root)
	if m, ok := mounts[rootDir]; !ok || hostPaths[m.Name] != rootDir {
		t.Errorf("root %s is not the host's %s: %+v", daemon.Root, rootDir, m)
	} else if m.MountPropagation == nil || *m.MountPropagation != corev1.MountPropagationBidirectional {
		t.Errorf("%s mounted without Bidirectional propagation", rootDir)
	}
	sockDir := filepath.Dir(daemon.Socket)
	if m, ok := mounts[sockDir]; !ok || hostPaths[m.Name] != sockDir {
		t.Errorf("socket directory %s is not the host's", sockDir)
	}
	if m, ok := mounts["/dev/fuse"]; !ok || hostPaths[m.Name] != "/dev/fuse" {
		t.Error("no /dev/fuse from the host")
	}
	if len(spec.InitContainers) == 0 {
		t.Error("no init container installs the containerd drop-in")
	}
	for _, c := range spec.InitContainers {
		if !strings.Contains(strings.Join(append(c.Command, c.Args...), " "), "/etc/containerd/conf.d/lazybase-stargz.toml") {
			t.Errorf("init container %s does not install lazybase-stargz.toml", c.Name)
		}
	}
}

// TestMirrorSecretsAndShutdown: the mirror config names its record key and
// serve token as files, and every pod that reads them mounts them from a
// Secret; the serve Deployment outlives its grace period, keeps its state
// file on its claim, and uses Recreate so the claim is free for the next pod.
func TestMirrorSecretsAndShutdown(t *testing.T) {
	objs := decodeAll(t)
	var cfg struct {
		RecordKeyFile string `toml:"record_key_file"`
		Serve         struct {
			TokenFile   string `toml:"token_file"`
			TokenEnv    string `toml:"token_env"`
			NoAuth      bool   `toml:"no_auth"`
			GracePeriod string `toml:"grace_period"`
			StateFile   string `toml:"state_file"`
		} `toml:"serve"`
	}
	found := false
	for _, o := range objs {
		if cm, ok := o.obj.(*corev1.ConfigMap); ok && cm.Name == "lazybase-mirror" {
			if err := toml.Unmarshal([]byte(cm.Data["mirror.toml"]), &cfg); err != nil {
				t.Fatalf("mirror.toml: %v", err)
			}
			found = true
		}
	}
	if !found {
		t.Fatal("no ConfigMap lazybase-mirror")
	}
	if cfg.RecordKeyFile == "" || cfg.Serve.TokenFile == "" || cfg.Serve.NoAuth {
		t.Fatalf("mirror.toml: record_key_file %q, serve.token_file %q, no_auth %v", cfg.RecordKeyFile, cfg.Serve.TokenFile, cfg.Serve.NoAuth)
	}
	grace, err := time.ParseDuration(cfg.Serve.GracePeriod)
	if err != nil {
		t.Fatalf("serve.grace_period: %v", err)
	}
	// secretDir reports whether file's directory is mounted from a Secret.
	secretDir := func(spec *corev1.PodSpec, c *corev1.Container, file string) bool {
		for _, m := range c.VolumeMounts {
			if m.MountPath != filepath.Dir(file) {
				continue
			}
			for _, v := range spec.Volumes {
				if v.Name == m.Name && v.Secret != nil {
					return true
				}
			}
		}
		return false
	}
	mountedFromClaim := func(spec *corev1.PodSpec, c *corev1.Container, file string) bool {
		for _, m := range c.VolumeMounts {
			if !strings.HasPrefix(file, m.MountPath+"/") {
				continue
			}
			for _, v := range spec.Volumes {
				if v.Name == m.Name && v.PersistentVolumeClaim != nil {
					return true
				}
			}
		}
		return false
	}
	pods := 0
	for _, o := range objs {
		var spec *corev1.PodSpec
		serve := false
		switch v := o.obj.(type) {
		case *appsv1.Deployment:
			if v.Name != "lazybase-mirror-serve" {
				continue
			}
			spec, serve = &v.Spec.Template.Spec, true
			if v.Spec.Strategy.Type != appsv1.RecreateDeploymentStrategyType {
				t.Errorf("%s: strategy %q, want Recreate (the state claim is ReadWriteOnce)", o.file, v.Spec.Strategy.Type)
			}
			var g int64 = 30 // Kubernetes' default
			if spec.TerminationGracePeriodSeconds != nil {
				g = *spec.TerminationGracePeriodSeconds
			}
			if time.Duration(g)*time.Second < grace+10*time.Second {
				t.Errorf("%s: terminationGracePeriodSeconds %d, want at least grace_period %s + 10s", o.file, g, grace)
			}
		case *batchv1.Job:
			spec = &v.Spec.Template.Spec
		case *batchv1.CronJob:
			spec = &v.Spec.JobTemplate.Spec.Template.Spec
		default:
			continue
		}
		for i := range spec.Containers {
			c := &spec.Containers[i]
			if len(c.Args) == 0 || c.Args[0] != "mirror" {
				continue
			}
			pods++
			if !secretDir(spec, c, cfg.RecordKeyFile) {
				t.Errorf("%s: container %s does not mount the record key %s from a Secret", o.file, c.Name, cfg.RecordKeyFile)
			}
			if serve {
				if !secretDir(spec, c, cfg.Serve.TokenFile) {
					t.Errorf("%s: container %s does not mount the serve token %s from a Secret", o.file, c.Name, cfg.Serve.TokenFile)
				}
				if !mountedFromClaim(spec, c, cfg.Serve.StateFile) {
					t.Errorf("%s: state file %s is not on a persistent volume claim", o.file, cfg.Serve.StateFile)
				}
			}
		}
	}
	if pods < 3 {
		t.Errorf("%d mirror pod templates checked, want the CronJob, the Job and the Deployment", pods)
	}
}
