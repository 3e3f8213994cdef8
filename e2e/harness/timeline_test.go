package harness

import (
	"bytes"
	"encoding/xml"
	"io"
	"strconv"
	"strings"
	"testing"
	"time"
)

// svgElement is what the tests read back from a rendered timeline.
type svgElement struct {
	Name  string
	Attrs map[string]string
	Text  string
}

// parseSVG decodes an SVG document strictly and returns its elements in
// order, failing the test when it is not well-formed XML.
func parseSVG(t *testing.T, b []byte) []svgElement {
	t.Helper()
	dec := xml.NewDecoder(bytes.NewReader(b))
	dec.Strict = true
	var out []svgElement
	var stack []int
	for {
		tok, err := dec.Token()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("SVG is not well-formed: %v\n%s", err, b)
		}
		switch tk := tok.(type) {
		case xml.StartElement:
			e := svgElement{Name: tk.Name.Local, Attrs: map[string]string{}}
			for _, a := range tk.Attr {
				e.Attrs[a.Name.Local] = a.Value
			}
			out = append(out, e)
			stack = append(stack, len(out)-1)
		case xml.CharData:
			// An element's text includes its children's (a span's
			// <title> tooltip).
			for _, i := range stack {
				out[i].Text += string(tk)
			}
		case xml.EndElement:
			stack = stack[:len(stack)-1]
		}
	}
	return out
}

func byClass(els []svgElement, class string) []svgElement {
	var out []svgElement
	for _, e := range els {
		if e.Attrs["class"] == class {
			out = append(out, e)
		}
	}
	return out
}

func attrFloat(t *testing.T, e svgElement, name string) float64 {
	t.Helper()
	f, err := strconv.ParseFloat(e.Attrs[name], 64)
	if err != nil {
		t.Fatalf("%s %s=%q: %v", e.Name, name, e.Attrs[name], err)
	}
	return f
}

func TestTimelineSVG(t *testing.T) {
	t0 := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	at := func(s float64) time.Time { return t0.Add(time.Duration(s * float64(time.Second))) }
	tl := Timeline{
		Title:  "one build <&>",
		Origin: t0,
		Lanes: []Lane{
			{Name: "BuildKit steps", Spans: []Span{
				{Label: "[builder 1/4] FROM golang", Start: at(0.1), End: at(1.2)},
				{Label: "[stage-1 1/2] FROM debian", Start: at(0.2), End: at(0.9)}, // overlaps: second row
				{Label: "[builder 4/4] RUN go build", Start: at(1.3), End: at(14.5)},
				{Label: "exporting to image", Start: at(14.6), End: at(16.0)},
			}},
			{Name: "background fetch", Spans: nil},
			{Name: "guard transfer", Spans: []Span{{Label: "sha256:abc", Start: at(0.3), End: at(4.0)}}},
		},
		Notes: []string{"export 1.4 s", "first RUN at 1.3 s"},
	}
	var a, b bytes.Buffer
	if err := tl.WriteSVG(&a); err != nil {
		t.Fatal(err)
	}
	if err := tl.WriteSVG(&b); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a.Bytes(), b.Bytes()) {
		t.Fatal("two renderings of one timeline differ")
	}
	els := parseSVG(t, a.Bytes())
	if els[0].Name != "svg" || els[0].Attrs["viewBox"] == "" {
		t.Fatalf("root element %+v, want an svg with a viewBox", els[0])
	}
	if title := byClass(els, "title"); len(title) != 1 || title[0].Text != "one build <&>" {
		t.Errorf("title %+v", title)
	}
	var names []string
	for _, e := range byClass(els, "lane-name") {
		names = append(names, e.Text)
	}
	if got := strings.Join(names, "|"); got != "BuildKit steps|background fetch|guard transfer" {
		t.Errorf("lane names %q", got)
	}
	if n := len(byClass(els, "none")); n != 1 {
		t.Errorf("%d empty-lane marks, want 1 (background fetch)", n)
	}
	spans := byClass(els, "span")
	if len(spans) != 5 {
		t.Fatalf("%d span rects, want 5", len(spans))
	}
	// Spans sit at x proportional to their start; the two overlapping
	// FROM steps are on different rows.
	ticks := byClass(els, "tick")
	if len(ticks) < 5 || ticks[0].Text != "0" {
		t.Fatalf("ticks %+v", ticks)
	}
	tick1, err := strconv.ParseFloat(ticks[1].Text, 64)
	if err != nil {
		t.Fatal(err)
	}
	scale := (attrFloat(t, ticks[1], "x") - attrFloat(t, ticks[0], "x")) / tick1 // px per second
	if x0, x1 := attrFloat(t, spans[0], "x"), attrFloat(t, spans[1], "x"); x1 <= x0 || x0 < attrFloat(t, ticks[0], "x") {
		t.Errorf("span x not increasing with start from the axis origin: %v, %v", spans[0].Attrs, spans[1].Attrs)
	}
	if y0, y1 := attrFloat(t, spans[0], "y"), attrFloat(t, spans[1], "y"); y0 == y1 {
		t.Errorf("overlapping spans on one row (y %v)", y0)
	}
	if y0, y2 := attrFloat(t, spans[0], "y"), attrFloat(t, spans[2], "y"); y0 != y2 {
		t.Errorf("RUN step (y %v) not on the first free row (y %v)", y2, y0)
	}
	if w := attrFloat(t, spans[2], "width"); w < 13.2*scale-0.1 || w > 13.2*scale+0.1 {
		t.Errorf("RUN step width %v px, want 13.2 s at %v px/s", w, scale)
	}
	if !strings.Contains(spans[2].Text, "[builder 4/4] RUN go build: 1.3 s – 14.5 s (13.2 s)") {
		t.Errorf("RUN step tooltip %q", spans[2].Text)
	}
	// The axis: ticks from 0 s past the last span's end (16 s), round steps.
	last, err := strconv.ParseFloat(ticks[len(ticks)-1].Text, 64)
	if err != nil || last < 16 {
		t.Errorf("last tick %q, want at least 16 s", ticks[len(ticks)-1].Text)
	}
	if len(byClass(els, "unit")) != 1 {
		t.Error("no axis unit")
	}
	notes := byClass(els, "note")
	if len(notes) != 2 || notes[0].Text != "export 1.4 s" || attrFloat(t, notes[1], "y") <= attrFloat(t, notes[0], "y") {
		t.Errorf("notes %+v, want two lines in order", notes)
	}
	if h := attrFloat(t, els[0], "height"); h < attrFloat(t, notes[1], "y") {
		t.Errorf("svg height %v cuts the last note at y %v", h, attrFloat(t, notes[1], "y"))
	}
}

func TestTimelineRejects(t *testing.T) {
	t0 := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	for _, tc := range []struct {
		name string
		tl   Timeline
		want string
	}{
		{"no lanes", Timeline{}, "no lanes"},
		{"lane without a name", Timeline{Lanes: []Lane{{}}}, "without a name"},
		{"end before start", Timeline{Lanes: []Lane{{Name: "x", Spans: []Span{{Label: "s", Start: t0, End: t0.Add(-time.Second)}}}}}, `span "s" ends`},
		{"no end", Timeline{Lanes: []Lane{{Name: "x", Spans: []Span{{Label: "s", Start: t0}}}}}, "no start or end"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var b bytes.Buffer
			err := tc.tl.WriteSVG(&b)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one containing %q", err, tc.want)
			}
			if b.Len() != 0 {
				t.Errorf("wrote %d bytes for a rejected timeline", b.Len())
			}
		})
	}
}

func TestTickStep(t *testing.T) {
	for _, tc := range []struct{ length, want float64 }{
		{0, 1}, {1, 0.1}, {9, 1}, {16, 2}, {35, 5}, {100, 10}, {130, 20},
	} {
		if got := tickStep(tc.length); got < tc.want*0.999 || got > tc.want*1.001 {
			t.Errorf("tickStep(%v) = %v, want %v", tc.length, got, tc.want)
		}
	}
}

func TestParseBuildSteps(t *testing.T) {
	raw := `{"vertexes":[{"digest":"sha256:a","name":"[internal] load build definition","started":"2026-01-02T03:04:05.1Z"}]}
{"vertexes":[{"digest":"sha256:a","name":"[internal] load build definition","started":"2026-01-02T03:04:05.1Z","completed":"2026-01-02T03:04:05.3Z"},{"digest":"sha256:b","name":"[builder 2/2] RUN go build","started":"2026-01-02T03:04:06Z"}],"statuses":[{"id":"x","vertex":"sha256:b"},{"id":"compiling","vertex":"sha256:b","started":"2026-01-02T03:04:07Z"}]}
{"statuses":[{"id":"compiling","vertex":"sha256:b","started":"2026-01-02T03:04:07Z","completed":"2026-01-02T03:04:19Z"}]}
{"vertexes":[{"digest":"sha256:b","name":"[builder 2/2] RUN go build","started":"2026-01-02T03:04:06Z","completed":"2026-01-02T03:04:20Z"},{"digest":"sha256:c","name":"never completed","started":"2026-01-02T03:04:06Z"}]}
`
	steps, err := ParseBuildSteps(raw)
	if err != nil {
		t.Fatal(err)
	}
	if len(steps) != 2 {
		t.Fatalf("steps %+v, want the two completed vertices", steps)
	}
	if steps[0].Name != "[internal] load build definition" || steps[1].Name != "[builder 2/2] RUN go build" {
		t.Errorf("steps out of order: %+v", steps)
	}
	if d := steps[1].Completed.Sub(steps[1].Started); d != 14*time.Second {
		t.Errorf("RUN step took %s, want 14s", d)
	}
	if st := steps[1].Statuses; len(st) != 1 || st[0].Name != "compiling" || st[0].Completed.Sub(st[0].Started) != 12*time.Second {
		t.Errorf("RUN step statuses %+v, want one, compiling, 12s (the one that never started left out)", st)
	}
	if len(steps[0].Statuses) != 0 {
		t.Errorf("statuses on the wrong vertex: %+v", steps[0].Statuses)
	}
	if _, err := ParseBuildSteps(`{"vertexes":[}`); err == nil {
		t.Error("malformed rawjson accepted")
	}
}
