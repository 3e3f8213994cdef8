package harness

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"sort"
	"strings"
	"time"
)

// Account is the lazybase daemon's CPU and I/O account, as the "account"
// of its status (lazypull.Status.Account) reports it: CPU seconds, units,
// registry bytes and bytes written by activity since the daemon started.
type Account struct {
	ProcessCPUSeconds float64            `json:"process_cpu_seconds"`
	GoGCCPUSeconds    float64            `json:"go_gc_cpu_seconds"`
	CPUSeconds        map[string]float64 `json:"cpu_seconds"`
	Units             map[string]int64   `json:"units"`
	RegistryBytes     map[string]int64   `json:"registry_bytes"`
	DiskWrittenBytes  map[string]int64   `json:"disk_written_bytes"`
}

// AccountedCPU returns the CPU time the account measured in its
// activities, fuse_and_other (the rest of the process's) left out.
func (a *Account) AccountedCPU() time.Duration {
	var s float64
	for act, v := range a.CPUSeconds {
		if act != "fuse_and_other" {
			s += v
		}
	}
	return time.Duration(s * float64(time.Second))
}

// String is the breakdown on one line, activities by name: CPU seconds
// and, where there are any, registry megabytes.
func (a *Account) String() string {
	names := make([]string, 0, len(a.CPUSeconds))
	for n := range a.CPUSeconds {
		names = append(names, n)
	}
	sort.Strings(names)
	parts := make([]string, 0, len(names)+1)
	for _, n := range names {
		p := fmt.Sprintf("%s %.2fs", n, a.CPUSeconds[n])
		if b := a.RegistryBytes[n]; b > 0 {
			p += fmt.Sprintf(" %.1fMB", float64(b)/1e6)
		}
		parts = append(parts, p)
	}
	if b := a.RegistryBytes["other"]; b > 0 {
		parts = append(parts, fmt.Sprintf("other fetches %.1fMB", float64(b)/1e6))
	}
	return fmt.Sprintf("process %.2fs (Go GC %.2fs): %s", a.ProcessCPUSeconds, a.GoGCCPUSeconds, strings.Join(parts, ", "))
}

// Account returns the lazybase daemon's CPU and I/O account, from GET
// /status on its status socket.
func (sn *Snapshotter) Account(ctx context.Context) (*Account, error) {
	socket := sn.StatusSocket()
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", socket)
	}}
	defer tr.CloseIdleConnections()
	c := &http.Client{Transport: tr, Timeout: 30 * time.Second}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://lazybase/status", nil)
	if err != nil {
		return nil, err
	}
	resp, err := c.Do(req)
	if err != nil {
		return nil, fmt.Errorf("status on %s: %w", socket, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return nil, fmt.Errorf("status on %s: %s: %s", socket, resp.Status, b)
	}
	var st struct {
		Account *Account `json:"account"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		return nil, fmt.Errorf("status on %s: decoding: %w", socket, err)
	}
	if st.Account == nil {
		return nil, fmt.Errorf("status on %s: no account (a daemon older than the CPU account?)", socket)
	}
	return st.Account, nil
}
