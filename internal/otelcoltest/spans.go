package otelcoltest

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"strconv"
	"time"
)

// Span is one span as the collector received it.
type Span struct {
	Name          string
	TraceID       string // 32 lowercase hex digits
	SpanID        string // 16 lowercase hex digits
	ParentSpanID  string // empty for a root span
	Kind          int    // OTLP SpanKind: 1 internal, 2 server, 3 client, 4 producer, 5 consumer
	Scope         string // instrumentation scope name
	StartTime     time.Time
	EndTime       time.Time
	StatusCode    int // 0 unset, 1 ok, 2 error
	StatusMessage string
	// Attribute values are string, int64, float64, bool, []byte, []any or
	// map[string]any, as in OTLP's AnyValue; nil for an empty value.
	Attributes map[string]any
	Resource   map[string]any // the resource's attributes
}

// ParseSpans decodes the file exporter's JSON output: one OTLP/JSON
// ExportTraceServiceRequest per line. Blank lines are skipped.
func ParseSpans(data []byte) ([]Span, error) {
	var spans []Span
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(nil, 256<<20) // one line is one batch
	for line := 1; sc.Scan(); line++ {
		b := bytes.TrimSpace(sc.Bytes())
		if len(b) == 0 {
			continue
		}
		var req exportRequest
		if err := json.Unmarshal(b, &req); err != nil {
			return spans, fmt.Errorf("line %d: %w", line, err)
		}
		for _, rs := range req.ResourceSpans {
			res, err := attributes(rs.Resource.Attributes)
			if err != nil {
				return spans, fmt.Errorf("line %d: resource: %w", line, err)
			}
			for _, ss := range rs.ScopeSpans {
				for _, s := range ss.Spans {
					span, err := s.span(res, ss.Scope.Name)
					if err != nil {
						return spans, fmt.Errorf("line %d: span %q: %w", line, s.Name, err)
					}
					spans = append(spans, span)
				}
			}
		}
	}
	return spans, sc.Err()
}

// The OTLP/JSON encoding (opentelemetry-proto, docs/specification.md):
// protobuf JSON with hex trace and span IDs, 64-bit integers as strings
// (numbers accepted) and enums as integers (names accepted).
type (
	exportRequest struct {
		ResourceSpans []struct {
			Resource struct {
				Attributes []keyValue `json:"attributes"`
			} `json:"resource"`
			ScopeSpans []struct {
				Scope struct {
					Name string `json:"name"`
				} `json:"scope"`
				Spans []jsonSpan `json:"spans"`
			} `json:"scopeSpans"`
		} `json:"resourceSpans"`
	}
	jsonSpan struct {
		TraceID           string          `json:"traceId"`
		SpanID            string          `json:"spanId"`
		ParentSpanID      string          `json:"parentSpanId"`
		Name              string          `json:"name"`
		Kind              json.RawMessage `json:"kind"`
		StartTimeUnixNano json.RawMessage `json:"startTimeUnixNano"`
		EndTimeUnixNano   json.RawMessage `json:"endTimeUnixNano"`
		Attributes        []keyValue      `json:"attributes"`
		Status            struct {
			Code    json.RawMessage `json:"code"`
			Message string          `json:"message"`
		} `json:"status"`
	}
	keyValue struct {
		Key   string   `json:"key"`
		Value anyValue `json:"value"`
	}
	anyValue struct {
		StringValue *string         `json:"stringValue"`
		BoolValue   *bool           `json:"boolValue"`
		IntValue    json.RawMessage `json:"intValue"`
		DoubleValue json.RawMessage `json:"doubleValue"`
		BytesValue  *[]byte         `json:"bytesValue"` // base64
		ArrayValue  *struct {
			Values []anyValue `json:"values"`
		} `json:"arrayValue"`
		KvlistValue *struct {
			Values []keyValue `json:"values"`
		} `json:"kvlistValue"`
	}
)

var (
	spanKinds   = map[string]int{"SPAN_KIND_UNSPECIFIED": 0, "SPAN_KIND_INTERNAL": 1, "SPAN_KIND_SERVER": 2, "SPAN_KIND_CLIENT": 3, "SPAN_KIND_PRODUCER": 4, "SPAN_KIND_CONSUMER": 5}
	statusCodes = map[string]int{"STATUS_CODE_UNSET": 0, "STATUS_CODE_OK": 1, "STATUS_CODE_ERROR": 2}
)

func (s jsonSpan) span(resource map[string]any, scope string) (Span, error) {
	span := Span{
		Name: s.Name, TraceID: s.TraceID, SpanID: s.SpanID, ParentSpanID: s.ParentSpanID,
		Scope: scope, StatusMessage: s.Status.Message, Resource: resource,
	}
	var err error
	if span.Kind, err = enum(s.Kind, spanKinds); err != nil {
		return span, fmt.Errorf("kind: %w", err)
	}
	if span.StatusCode, err = enum(s.Status.Code, statusCodes); err != nil {
		return span, fmt.Errorf("status code: %w", err)
	}
	if span.StartTime, err = unixNano(s.StartTimeUnixNano); err != nil {
		return span, fmt.Errorf("start time: %w", err)
	}
	if span.EndTime, err = unixNano(s.EndTimeUnixNano); err != nil {
		return span, fmt.Errorf("end time: %w", err)
	}
	if span.Attributes, err = attributes(s.Attributes); err != nil {
		return span, err
	}
	return span, nil
}

func attributes(kvs []keyValue) (map[string]any, error) {
	m := make(map[string]any, len(kvs))
	for _, kv := range kvs {
		v, err := kv.Value.value()
		if err != nil {
			return nil, fmt.Errorf("attribute %q: %w", kv.Key, err)
		}
		m[kv.Key] = v
	}
	return m, nil
}

func (v anyValue) value() (any, error) {
	switch {
	case v.StringValue != nil:
		return *v.StringValue, nil
	case v.BoolValue != nil:
		return *v.BoolValue, nil
	case v.IntValue != nil:
		return strconv.ParseInt(unquote(v.IntValue), 10, 64)
	case v.DoubleValue != nil:
		switch s := unquote(v.DoubleValue); s {
		case "NaN":
			return math.NaN(), nil
		case "Infinity":
			return math.Inf(1), nil
		case "-Infinity":
			return math.Inf(-1), nil
		default:
			return strconv.ParseFloat(s, 64)
		}
	case v.BytesValue != nil:
		return *v.BytesValue, nil
	case v.ArrayValue != nil:
		a := make([]any, len(v.ArrayValue.Values))
		for i, e := range v.ArrayValue.Values {
			var err error
			if a[i], err = e.value(); err != nil {
				return nil, err
			}
		}
		return a, nil
	case v.KvlistValue != nil:
		return attributes(v.KvlistValue.Values)
	}
	return nil, nil
}

// unixNano decodes a fixed64 of nanoseconds since the epoch; zero (or
// absent) is the zero time.
func unixNano(raw json.RawMessage) (time.Time, error) {
	if raw == nil {
		return time.Time{}, nil
	}
	n, err := strconv.ParseUint(unquote(raw), 10, 64)
	if err != nil || n == 0 {
		return time.Time{}, err
	}
	if n > math.MaxInt64 {
		return time.Time{}, fmt.Errorf("%d ns out of range", n)
	}
	return time.Unix(0, int64(n)).UTC(), nil
}

func enum(raw json.RawMessage, names map[string]int) (int, error) {
	if raw == nil {
		return 0, nil
	}
	s := unquote(raw)
	if n, ok := names[s]; ok {
		return n, nil
	}
	return strconv.Atoi(s)
}

// unquote returns a JSON string's contents, or a number's text.
func unquote(raw json.RawMessage) string {
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return s
	}
	return string(raw)
}
