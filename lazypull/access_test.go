package lazypull

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/containerd/log"
	"github.com/sirupsen/logrus"
	logtest "github.com/sirupsen/logrus/hooks/test"
)

// stargzLogsAccess logs the first access to path of layer the way stargz
// v0.19.1 does (fs/layer/node.go, logAccessOnce): on log.G of go-fuse's
// request context, which carries no logger, at debug level.
func stargzLogsAccess(layer, path string, size int64) {
	log.G(context.Background()).WithFields(log.Fields{
		"layer": layer,
		"size":  size,
		"mode":  "0644",
	}).Debugf("file accessed: %s", path)
}

// processLogger saves the standard logger's state and log.L, sets the
// logger to level with output into the returned buffer and a test hook,
// and restores everything when the test ends.
func processLogger(t *testing.T, level logrus.Level) (*logrus.Logger, *bytes.Buffer, *logtest.Hook) {
	t.Helper()
	lg := logrus.StandardLogger()
	oldL, oldOut, oldFmt, oldLevel := log.L, lg.Out, lg.Formatter, lg.GetLevel()
	var out bytes.Buffer
	lg.SetOutput(&out)
	lg.SetFormatter(&logrus.TextFormatter{DisableTimestamp: true, DisableColors: true})
	lg.SetLevel(level)
	hook := new(logtest.Hook)
	oldHooks := lg.ReplaceHooks(logrus.LevelHooks{})
	lg.AddHook(hook)
	t.Cleanup(func() {
		log.L = oldL
		lg.ReplaceHooks(oldHooks)
		lg.SetOutput(oldOut)
		lg.SetFormatter(oldFmt)
		lg.SetLevel(oldLevel)
	})
	return lg, &out, hook
}

func copyHooks(h logrus.LevelHooks) logrus.LevelHooks {
	out := make(logrus.LevelHooks, len(h))
	for l, hs := range h {
		out[l] = append([]logrus.Hook(nil), hs...)
	}
	return out
}

// TestAccessRecordingLeavesProcessLoggerAlone records the entries stargz
// logs for two images' layers into one file per image, in access order,
// while the process logger keeps its level, formatter and hooks, logs
// exactly what it would log without recording, and keeps a hook added
// during recording after recording stops. It needs no FUSE: it logs what
// stargz logs.
func TestAccessRecordingLeavesProcessLoggerAlone(t *testing.T) {
	const imgA, imgB = "registry.test/a:1", "registry.test/b:1"
	layerA, layerB := "sha256:"+strings.Repeat("a", 64), "sha256:"+strings.Repeat("b", 64)
	lg, out, hook := processLogger(t, logrus.InfoLevel)
	fs := newTrackingFS(nil, newMetrics())
	fs.mounts["/m/a"] = mountRecord{image: imgA, layer: layerA}
	fs.mounts["/m/b"] = mountRecord{image: imgB, layer: layerB}
	formatter, hooks, oldL := lg.Formatter, copyHooks(lg.Hooks), log.L

	dir := filepath.Join(t.TempDir(), "access")
	r, err := startAccessRecording(dir, fs)
	if err != nil {
		t.Fatal(err)
	}
	if lg.GetLevel() != logrus.InfoLevel || lg.Formatter != formatter || !reflect.DeepEqual(lg.Hooks, hooks) {
		t.Errorf("recording changed the process logger: level %s, formatter %T, hooks %v", lg.GetLevel(), lg.Formatter, lg.Hooks)
	}
	stargzLogsAccess(layerA, "/usr/bin/tool", 42)
	stargzLogsAccess(layerB, "/etc/os-release", 7)
	log.G(context.Background()).WithField("k", "v").Info("an info entry")
	log.G(context.Background()).Debug("a debug entry")
	added := new(logtest.Hook)
	lg.AddHook(added)
	stargzLogsAccess(layerA, "/etc/hello.txt", 12)
	log.G(context.Background()).Warn("a warning")
	if err := r.stop(); err != nil {
		t.Fatal(err)
	}
	stargzLogsAccess(layerA, "/after/stop", 1)

	if log.L != oldL {
		t.Error("log.L not restored after recording")
	}
	if lg.GetLevel() != logrus.InfoLevel || lg.Formatter != formatter {
		t.Errorf("process logger after recording: level %s, formatter %T", lg.GetLevel(), lg.Formatter)
	}
	for _, l := range logrus.AllLevels {
		if hs := lg.Hooks[l]; len(hs) != 2 || hs[0] != logrus.Hook(hook) || hs[1] != logrus.Hook(added) {
			t.Errorf("process logger hooks at %s after recording: %v, want the test hook and the one added while recording", l, hs)
		}
	}
	var msgs []string
	for _, e := range hook.AllEntries() {
		msgs = append(msgs, e.Level.String()+" "+e.Message)
	}
	if want := []string{"info an info entry", "warning a warning"}; !reflect.DeepEqual(msgs, want) {
		t.Errorf("process logger saw %q, want %q", msgs, want)
	}
	if got, want := out.String(), "level=info msg=\"an info entry\" k=v\nlevel=warning msg=\"a warning\"\n"; got != want {
		t.Errorf("process logger wrote %q, want %q", got, want)
	}
	if n := len(added.AllEntries()); n != 1 {
		t.Errorf("hook added while recording saw %d entries, want 1 (the warning)", n)
	}

	for _, c := range []struct {
		image string
		want  []AccessRecord
	}{
		{imgA, []AccessRecord{
			{Image: imgA, Layer: layerA, Path: "/usr/bin/tool", Size: 42},
			{Image: imgA, Layer: layerA, Path: "/etc/hello.txt", Size: 12},
		}},
		{imgB, []AccessRecord{{Image: imgB, Layer: layerB, Path: "/etc/os-release", Size: 7}}},
	} {
		b, err := os.ReadFile(filepath.Join(dir, AccessRecordFile(c.image)))
		if err != nil {
			t.Fatal(err)
		}
		var recs []AccessRecord
		for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
			var r AccessRecord
			if err := json.Unmarshal([]byte(line), &r); err != nil {
				t.Fatalf("record %q of %s: %v", line, c.image, err)
			}
			recs = append(recs, r)
		}
		for i := range recs {
			if recs[i].Time.IsZero() {
				t.Errorf("record %d of %s has no time", i, c.image)
			}
			recs[i].Time = c.want[0].Time
		}
		if !reflect.DeepEqual(recs, c.want) {
			t.Errorf("records of %s: %+v, want %+v", c.image, recs, c.want)
		}
	}
	ents, err := os.ReadDir(dir)
	if err != nil || len(ents) != 2 {
		t.Errorf("record directory holds %v (%v), want the two images' files", ents, err)
	}
}

// TestAccessRecordingForwardsAccessEntriesAtDebug: a process logging at
// debug level still logs stargz's first-access entries while they are
// recorded, as it does without recording.
func TestAccessRecordingForwardsAccessEntriesAtDebug(t *testing.T) {
	_, out, _ := processLogger(t, logrus.DebugLevel)
	fs := newTrackingFS(nil, newMetrics())
	fs.mounts["/m"] = mountRecord{image: "registry.test/a:1", layer: "sha256:aaaa"}
	r, err := startAccessRecording(t.TempDir(), fs)
	if err != nil {
		t.Fatal(err)
	}
	stargzLogsAccess("sha256:aaaa", "/bin/sh", 3)
	if err := r.stop(); err != nil {
		t.Fatal(err)
	}
	want := "level=debug msg=\"file accessed: /bin/sh\" layer=\"sha256:aaaa\" mode=0644 size=3\n"
	if got := out.String(); got != want {
		t.Errorf("process logger wrote %q, want %q", got, want)
	}
}

// TestAccessRecordingReportsWriteFailureOnce: when a record cannot be
// written, the process logger gets one warning naming the image and the
// file, not one per access.
func TestAccessRecordingReportsWriteFailureOnce(t *testing.T) {
	_, _, hook := processLogger(t, logrus.InfoLevel)
	fs := newTrackingFS(nil, newMetrics())
	fs.mounts["/m"] = mountRecord{image: "registry.test/a:1", layer: "sha256:aaaa"}
	dir := t.TempDir()
	r, err := startAccessRecording(dir, fs)
	if err != nil {
		t.Fatal(err)
	}
	// A directory where the image's record file would be.
	if err := os.Mkdir(filepath.Join(dir, AccessRecordFile("registry.test/a:1")), 0o700); err != nil {
		t.Fatal(err)
	}
	stargzLogsAccess("sha256:aaaa", "/bin/sh", 3)
	stargzLogsAccess("sha256:aaaa", "/bin/ls", 4)
	if err := r.stop(); err != nil {
		t.Fatal(err)
	}
	ents := hook.AllEntries()
	if len(ents) != 1 || ents[0].Level != logrus.WarnLevel || ents[0].Data["image"] != "registry.test/a:1" || ents[0].Data["path"] != "/bin/sh" {
		t.Fatalf("process logger saw %v, want one warning about /bin/sh of registry.test/a:1", ents)
	}
	if err, _ := ents[0].Data[logrus.ErrorKey].(error); err == nil || !strings.Contains(err.Error(), "registry.test/a:1") {
		t.Errorf("warning's error %v does not name the image", err)
	}
}

// TestAccessFilesClosed: a record after close fails and creates no file.
func TestAccessFilesClosed(t *testing.T) {
	dir := t.TempDir()
	a, err := newAccessFiles(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.close(); err != nil {
		t.Fatal(err)
	}
	if err := a.recordAccess(context.Background(), AccessRecord{Image: "x", Path: "/y"}); err == nil {
		t.Error("record after close succeeded")
	}
	if ents, err := os.ReadDir(dir); err != nil || len(ents) != 0 {
		t.Errorf("record directory holds %v (%v) after a record after close", ents, err)
	}
}
