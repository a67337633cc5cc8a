package gateway

import (
	"encoding/base64"
	"net/http"
	"strconv"
	"strings"

	"github.com/vartalap/vartalap/internal/api"
	"github.com/vartalap/vartalap/schema"
)

// restError reports one rejected entry of POST /messages.
type restError struct {
	Index  int    `json:"index"`
	ID     string `json:"id,omitempty"`
	Code   string `json:"code"`
	Reason string `json:"reason"`
}

// restResponse is the body of POST /messages. On success (201) only Acks
// (with ack=true) and Errors (when some entries failed) are set; when every
// entry failed, Status/Error/Message follow api.ErrorBody.
type restResponse struct {
	Status  *bool       `json:"status,omitempty"`
	Error   string      `json:"error,omitempty"`
	Message string      `json:"message,omitempty"`
	Acks    []string    `json:"acks,omitzero"`
	Errors  []restError `json:"errors,omitempty"`
}

// restEntry is the outcome of one entry.
type restEntry struct {
	msg *schema.Message // decoded and valid; nil after a rejection
	err *restError
}

// serveMessages is POST /messages: a JSON array of message strings (JSON
// messages, or base64 protobuf with format=binary). Each entry is handled on
// its own; a bad entry is reported without losing the others. Differences
// from the seed: only ack=true or ack=1 asks for acks (the seed took any
// non-empty value, even "false"); CLIENT_ACKs reach the delivery service
// (the seed published them as messages to "server", losing them); a bad
// entry no longer fails the whole request with 500.
func (g *Gateway) serveMessages(w http.ResponseWriter, r *http.Request) {
	id, ok := api.IdentityFrom(r.Context())
	if !ok {
		api.WriteError(w, http.StatusUnauthorized, api.CodeUnauthenticated, "not authenticated")
		return
	}
	if id, ok = g.checkIdentity(w, id); !ok {
		return
	}
	var raw []string
	if !api.DecodeJSON(w, r, int64(g.cfg.MaxRESTMessages)*int64(g.cfg.MaxFrameBytes), &raw) {
		return
	}
	if len(raw) == 0 {
		api.WriteError(w, http.StatusBadRequest, api.CodeBadRequest, "expected a non-empty JSON array of message strings")
		return
	}
	if len(raw) > g.cfg.MaxRESTMessages {
		api.WriteError(w, http.StatusRequestEntityTooLarge, api.CodeTooLarge,
			"at most "+strconv.Itoa(g.cfg.MaxRESTMessages)+" messages per request")
		return
	}
	q := r.URL.Query()
	binary := q.Get("format") == "binary"
	ack := q.Get("ack")
	wantAck := strings.EqualFold(ack, "true") || ack == "1"

	entries := make([]restEntry, len(raw))
	var ackIDs []string
	var ackIdx, pubIdx []int
	var pub []*schema.Message
	now := nowMs()
	for i, s := range raw {
		m, err := g.decodeEntry(s, binary)
		if err == nil {
			err = m.Validate()
		}
		if err != nil {
			code, mid, reason := decodeFailure(err)
			entries[i].err = &restError{Index: i, ID: mid, Code: code, Reason: reason}
			g.metrics.reject(code)
			g.log.Info("message rejected", "user", string(id.User), "index", i, "code", code, "msg_id", mid)
			continue
		}
		entries[i].msg = m
		if m.Type == schema.TypeClientAck {
			ackIDs = append(ackIDs, m.ID)
			ackIdx = append(ackIdx, i)
			continue
		}
		if m.Channel == schema.ChannelGroup {
			if !g.admitGroup(r.Context()) {
				entries[i].err = &restError{Index: i, ID: m.ID, Code: schema.CodeRateLimited, Reason: busyReason}
				g.metrics.reject(schema.CodeRateLimited)
				g.log.Info("message rejected", "user", string(id.User), "index", i, "code", schema.CodeRateLimited, "msg_id", m.ID)
				continue
			}
			now = nowMs() // it may have waited
		}
		m.Stamp(id.User, newServerID(), now)
		pub = append(pub, m)
		pubIdx = append(pubIdx, i)
	}
	if len(ackIDs) > 0 {
		if err := g.cfg.Delivery.AckByID(r.Context(), id.User, id.Device, ackIDs); err != nil {
			g.log.Warn("rest client ack failed", "user", string(id.User), "device", string(id.Device), "err", err)
			for _, i := range ackIdx {
				entries[i].err = unavailable(i, entries[i].msg.ID)
			}
		}
	}
	if len(pub) > 0 {
		for k, err := range g.publishAll(r.Context(), id.User, id.Device, pub) {
			if err != nil {
				i := pubIdx[k]
				g.log.Warn("publish failed", "user", string(id.User), "msg_id", pub[k].ID, "err", err)
				entries[i].err = unavailable(i, pub[k].ID)
				g.metrics.reject(schema.CodeUnavailable)
				continue
			}
			g.metrics.accepted.Inc()
		}
	}

	var resp restResponse
	if wantAck {
		resp.Acks = make([]string, 0, len(pub))
	}
	failed, allUnavailable := 0, true
	for _, e := range entries {
		if e.err != nil {
			failed++
			allUnavailable = allUnavailable && e.err.Code == schema.CodeUnavailable
			resp.Errors = append(resp.Errors, *e.err)
			continue
		}
		if wantAck && e.msg.Type != schema.TypeClientAck {
			sa := schema.ServerAck(e.msg)
			if binary {
				resp.Acks = append(resp.Acks, base64.StdEncoding.EncodeToString(sa.MarshalProto()))
			} else {
				resp.Acks = append(resp.Acks, string(schema.RenderJSON(sa)))
			}
		}
	}
	if failed == len(entries) {
		status := http.StatusBadRequest
		if allUnavailable {
			status = http.StatusServiceUnavailable
		}
		f := false
		api.WriteJSON(w, status, restResponse{
			Status: &f, Error: resp.Errors[0].Code, Message: "no message accepted", Errors: resp.Errors,
		})
		return
	}
	api.WriteJSON(w, http.StatusCreated, resp)
}

func unavailable(i int, id string) *restError {
	return &restError{Index: i, ID: id, Code: schema.CodeUnavailable, Reason: "message not stored; resend it"}
}

// decodeEntry decodes one REST entry: base64 protobuf (standard or URL
// alphabet, padding optional, like the seed's Buffer.from) or a JSON
// message. Entries over MaxFrameBytes are rejected as too_large.
func (g *Gateway) decodeEntry(s string, binary bool) (*schema.Message, error) {
	tooLarge := func() error {
		return &schema.DecodeError{Code: schema.CodeTooLarge,
			Reason: "message exceeds " + strconv.Itoa(g.cfg.MaxFrameBytes) + " bytes"}
	}
	if !binary {
		if len(s) > g.cfg.MaxFrameBytes {
			return nil, tooLarge()
		}
		return schema.DecodeJSON([]byte(s))
	}
	if base64.RawStdEncoding.DecodedLen(len(s)) > g.cfg.MaxFrameBytes+2 {
		return nil, tooLarge()
	}
	s = strings.TrimRight(s, "=")
	if strings.ContainsAny(s, "-_") {
		s = strings.NewReplacer("-", "+", "_", "/").Replace(s)
	}
	data, err := base64.RawStdEncoding.DecodeString(s)
	if err != nil {
		return nil, &schema.DecodeError{Code: schema.CodeMalformed, Reason: "entry is not base64"}
	}
	if len(data) > g.cfg.MaxFrameBytes {
		return nil, tooLarge()
	}
	return schema.DecodeProto(data)
}
