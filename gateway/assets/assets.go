package assets

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net/http"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/go-chi/chi/v5"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/vartalap/vartalap/internal/api"
)

// Bucket names and keys owned by this package.
const (
	// ObjectBucket is the Object Store bucket holding uploaded files, one
	// object per file id.
	ObjectBucket = "assets"
	// MetaBucket is the KV bucket holding file metadata (key "f.<fileId>")
	// and the URL signing key (key "signing-key").
	MetaBucket = "assets_meta"

	signingKeyKey = "signing-key"
	signingKeyLen = 32
	maxJSONBody   = 4 << 10
)

const (
	opPut = "put"
	opGet = "get"
)

var (
	extRE      = regexp.MustCompile(`^\.[A-Za-z0-9]{1,10}$`)
	categoryRE = regexp.MustCompile(`^[A-Za-z0-9_-]{1,32}$`)
	fileIDRE   = regexp.MustCompile(`^[0-9a-f]{24}$`)
)

// Config configures the asset service.
type Config struct {
	// JS is the JetStream context holding the buckets. Required.
	JS jetstream.JetStream
	// Logger receives operational logs. Default: discard.
	Logger *slog.Logger
	// Auth authenticates the seed's user + accesskey credentials. Required.
	Auth api.Authenticator
	// MaxBytes is the largest accepted upload in bytes. Default 25 MiB.
	MaxBytes int64
	// URLExpiry is the lifetime of a signed upload or download URL.
	// Default 10 minutes (the seed's --url-expire-time of 600 s).
	URLExpiry time.Duration
	// Replicas is the replica count of both buckets. Default 1.
	Replicas int
	// Now is the clock used to sign and check URL expiry. Default time.Now.
	Now func() time.Time
}

// Service serves the presigned-URL file API over a NATS Object Store.
type Service struct {
	cfg   Config
	log   *slog.Logger
	state atomic.Pointer[state]
}

// state is what Setup establishes; handlers answer 503 until it is set.
type state struct {
	kv  jetstream.KeyValue
	obs jetstream.ObjectStore
	key []byte
}

// meta is the metadata record of one file, stored as JSON under f.<fileId>.
type meta struct {
	FileID      string    `json:"fileId"`
	Owner       string    `json:"owner"`
	Category    string    `json:"category"`
	ContentType string    `json:"contentType"`
	CreatedAt   time.Time `json:"createdAt"`
	Status      bool      `json:"status"`
}

// New validates cfg and fills its defaults.
func New(cfg Config) (*Service, error) {
	if cfg.JS == nil {
		return nil, errors.New("assets: JS is required")
	}
	if cfg.Auth == nil {
		return nil, errors.New("assets: Auth is required")
	}
	if cfg.MaxBytes < 0 || cfg.URLExpiry < 0 || cfg.Replicas < 0 {
		return nil, errors.New("assets: MaxBytes, URLExpiry and Replicas must not be negative")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.MaxBytes == 0 {
		cfg.MaxBytes = 25 << 20
	}
	if cfg.URLExpiry == 0 {
		cfg.URLExpiry = 10 * time.Minute
	}
	if cfg.Replicas == 0 {
		cfg.Replicas = 1
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &Service{cfg: cfg, log: cfg.Logger}, nil
}

// Setup creates or updates the Object Store bucket "assets" and the KV
// bucket "assets_meta", and loads the URL signing key, creating it if no
// gateway has yet. It is idempotent and safe to run from several gateways
// at once: all of them end up with the same key.
func (s *Service) Setup(ctx context.Context) error {
	kv, err := s.cfg.JS.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket:      MetaBucket,
		Description: "vartalap file metadata and URL signing key",
		History:     1,
		Storage:     jetstream.FileStorage,
		Replicas:    s.cfg.Replicas,
	})
	if err != nil {
		return fmt.Errorf("assets: create kv %s: %w", MetaBucket, err)
	}
	obs, err := s.cfg.JS.CreateOrUpdateObjectStore(ctx, jetstream.ObjectStoreConfig{
		Bucket:      ObjectBucket,
		Description: "vartalap uploaded files",
		Storage:     jetstream.FileStorage,
		Replicas:    s.cfg.Replicas,
	})
	if err != nil {
		return fmt.Errorf("assets: create object store %s: %w", ObjectBucket, err)
	}
	key, err := loadSigningKey(ctx, kv)
	if err != nil {
		return err
	}
	s.state.Store(&state{kv: kv, obs: obs, key: key})
	return nil
}

func loadSigningKey(ctx context.Context, kv jetstream.KeyValue) ([]byte, error) {
	fresh := make([]byte, signingKeyLen)
	if _, err := rand.Read(fresh); err != nil {
		return nil, fmt.Errorf("assets: generate signing key: %w", err)
	}
	if _, err := kv.Create(ctx, signingKeyKey, fresh); err == nil {
		return fresh, nil
	} else if !errors.Is(err, jetstream.ErrKeyExists) {
		return nil, fmt.Errorf("assets: store signing key: %w", err)
	}
	e, err := kv.Get(ctx, signingKeyKey)
	if err != nil {
		return nil, fmt.Errorf("assets: load signing key: %w", err)
	}
	if len(e.Value()) != signingKeyLen {
		return nil, fmt.Errorf("assets: signing key has %d bytes, want %d", len(e.Value()), signingKeyLen)
	}
	return e.Value(), nil
}

// Routes registers the file API on r. Paths carry no "/v1.0" prefix; the
// root router wraps everything in api.StripVersion.
func (s *Service) Routes(r chi.Router) {
	r.Group(func(r chi.Router) {
		r.Use(api.RequireAuth(s.cfg.Auth, s.log))
		for _, p := range []string{"/assets", "/file"} {
			r.Get(p+"/upload/presigned_url", s.handleUploadURL)
			r.Post(p+"/upload/presigned_url", s.handleUploadURL)
			r.Put(p+"/{fileId}/status", s.handleStatus)
			r.Get(p+"/download/{fileId}/presigned_url", s.handleDownloadURL)
		}
	})
	// Signed blob URLs carry no credentials, like S3 presigned URLs.
	r.Put("/assets/blob/{fileId}", s.handleBlobPut)
	r.Get("/assets/blob/{fileId}", s.handleBlobGet)
}

func (s *Service) ready(w http.ResponseWriter) *state {
	st := s.state.Load()
	if st == nil {
		api.WriteError(w, http.StatusServiceUnavailable, api.CodeUnavailable, "file service not ready")
	}
	return st
}

func (s *Service) handleUploadURL(w http.ResponseWriter, r *http.Request) {
	st := s.ready(w)
	if st == nil {
		return
	}
	id, _ := api.IdentityFrom(r.Context())
	var req struct {
		Ext      string `json:"ext"`
		Category string `json:"category"`
	}
	if r.Method == http.MethodPost {
		if !api.DecodeJSON(w, r, maxJSONBody, &req) {
			return
		}
	} else {
		req.Ext = r.URL.Query().Get("ext")
		req.Category = r.URL.Query().Get("category")
	}
	if !extRE.MatchString(req.Ext) {
		api.WriteError(w, http.StatusBadRequest, api.CodeBadRequest, "ext must be a dot and 1 to 10 letters or digits")
		return
	}
	if !categoryRE.MatchString(req.Category) {
		api.WriteError(w, http.StatusBadRequest, api.CodeBadRequest, "category must be 1 to 32 letters, digits, '_' or '-'")
		return
	}
	fileID, err := newFileID(s.cfg.Now())
	if err != nil {
		s.log.Error("new file id", "err", err)
		api.WriteError(w, http.StatusInternalServerError, api.CodeInternal, "internal error")
		return
	}
	m := meta{
		FileID:      fileID,
		Owner:       string(id.User),
		Category:    req.Category,
		ContentType: contentType(req.Ext),
		CreatedAt:   s.cfg.Now().UTC(),
	}
	b, err := json.Marshal(m)
	if err != nil {
		s.log.Error("encode file meta", "file_id", fileID, "err", err)
		api.WriteError(w, http.StatusInternalServerError, api.CodeInternal, "internal error")
		return
	}
	if _, err := st.kv.Create(r.Context(), metaKey(fileID), b); err != nil {
		s.log.Error("store file meta", "user", id.User, "file_id", fileID, "err", err)
		api.WriteError(w, http.StatusServiceUnavailable, api.CodeUnavailable, "file store unavailable")
		return
	}
	api.WriteJSON(w, http.StatusOK, map[string]string{
		"url":    s.signedURL(r, st.key, opPut, fileID),
		"fileId": fileID,
	})
}

func (s *Service) handleStatus(w http.ResponseWriter, r *http.Request) {
	st := s.ready(w)
	if st == nil {
		return
	}
	id, _ := api.IdentityFrom(r.Context())
	fileID := chi.URLParam(r, "fileId")
	if !fileIDRE.MatchString(fileID) {
		api.WriteError(w, http.StatusBadRequest, api.CodeBadRequest, "malformed file id")
		return
	}
	var req struct {
		Status *bool `json:"status"`
	}
	if !api.DecodeJSON(w, r, maxJSONBody, &req) {
		return
	}
	if req.Status == nil {
		api.WriteError(w, http.StatusBadRequest, api.CodeBadRequest, "status is required")
		return
	}
	m, rev, ok := s.loadMeta(r.Context(), w, st, fileID)
	if !ok {
		return
	}
	if m.Owner != string(id.User) {
		// Like the seed: another user's file looks like a missing one.
		api.WriteError(w, http.StatusNotFound, api.CodeNotFound, "file not found")
		return
	}
	if m.Status {
		api.WriteError(w, http.StatusBadRequest, api.CodeBadRequest, "bad request")
		return
	}
	if !*req.Status {
		w.WriteHeader(http.StatusOK)
		return
	}
	if _, err := st.obs.GetInfo(r.Context(), fileID); errors.Is(err, jetstream.ErrObjectNotFound) {
		api.WriteError(w, http.StatusConflict, api.CodeConflict, "file has not been uploaded")
		return
	} else if err != nil {
		s.log.Error("get object info", "file_id", fileID, "err", err)
		api.WriteError(w, http.StatusServiceUnavailable, api.CodeUnavailable, "file store unavailable")
		return
	}
	m.Status = true
	b, err := json.Marshal(m)
	if err != nil {
		s.log.Error("encode file meta", "file_id", fileID, "err", err)
		api.WriteError(w, http.StatusInternalServerError, api.CodeInternal, "internal error")
		return
	}
	if _, err := st.kv.Update(r.Context(), metaKey(fileID), b, rev); err != nil {
		if errors.Is(err, jetstream.ErrKeyExists) {
			// A concurrent status update won the race: it is already true.
			api.WriteError(w, http.StatusBadRequest, api.CodeBadRequest, "bad request")
			return
		}
		s.log.Error("update file meta", "file_id", fileID, "err", err)
		api.WriteError(w, http.StatusServiceUnavailable, api.CodeUnavailable, "file store unavailable")
		return
	}
	w.WriteHeader(http.StatusOK)
}

func (s *Service) handleDownloadURL(w http.ResponseWriter, r *http.Request) {
	st := s.ready(w)
	if st == nil {
		return
	}
	fileID := chi.URLParam(r, "fileId")
	if !fileIDRE.MatchString(fileID) {
		api.WriteError(w, http.StatusBadRequest, api.CodeBadRequest, "malformed file id")
		return
	}
	m, _, ok := s.loadMeta(r.Context(), w, st, fileID)
	if !ok {
		return
	}
	if !m.Status {
		api.WriteError(w, http.StatusNotFound, api.CodeNotFound, "file not found")
		return
	}
	api.WriteJSON(w, http.StatusOK, map[string]string{"url": s.signedURL(r, st.key, opGet, fileID)})
}

func (s *Service) handleBlobPut(w http.ResponseWriter, r *http.Request) {
	st := s.ready(w)
	if st == nil {
		return
	}
	fileID, ok := s.checkSignature(w, r, st.key, opPut)
	if !ok {
		return
	}
	m, _, ok := s.loadMeta(r.Context(), w, st, fileID)
	if !ok {
		return
	}
	if m.Status {
		api.WriteError(w, http.StatusConflict, api.CodeConflict, "file is already complete")
		return
	}
	if r.ContentLength > s.cfg.MaxBytes {
		api.WriteError(w, http.StatusRequestEntityTooLarge, api.CodeTooLarge, "file too large")
		return
	}
	body := http.MaxBytesReader(w, r.Body, s.cfg.MaxBytes)
	_, err := st.obs.Put(r.Context(), jetstream.ObjectMeta{
		Name:    fileID,
		Headers: map[string][]string{"Content-Type": {m.ContentType}},
	}, body)
	var mbe *http.MaxBytesError
	switch {
	case errors.As(err, &mbe):
		api.WriteError(w, http.StatusRequestEntityTooLarge, api.CodeTooLarge, "file too large")
		return
	case err != nil:
		if r.Context().Err() != nil {
			s.log.Info("upload aborted", "file_id", fileID, "err", err)
			return
		}
		s.log.Error("put object", "file_id", fileID, "err", err)
		api.WriteError(w, http.StatusServiceUnavailable, api.CodeUnavailable, "file store unavailable")
		return
	}
	w.WriteHeader(http.StatusOK)
}

func (s *Service) handleBlobGet(w http.ResponseWriter, r *http.Request) {
	st := s.ready(w)
	if st == nil {
		return
	}
	fileID, ok := s.checkSignature(w, r, st.key, opGet)
	if !ok {
		return
	}
	m, _, ok := s.loadMeta(r.Context(), w, st, fileID)
	if !ok {
		return
	}
	obj, err := st.obs.Get(r.Context(), fileID)
	if errors.Is(err, jetstream.ErrObjectNotFound) {
		api.WriteError(w, http.StatusNotFound, api.CodeNotFound, "file not found")
		return
	}
	if err != nil {
		s.log.Error("get object", "file_id", fileID, "err", err)
		api.WriteError(w, http.StatusServiceUnavailable, api.CodeUnavailable, "file store unavailable")
		return
	}
	defer obj.Close()
	info, err := obj.Info()
	if err != nil {
		s.log.Error("get object info", "file_id", fileID, "err", err)
		api.WriteError(w, http.StatusServiceUnavailable, api.CodeUnavailable, "file store unavailable")
		return
	}
	w.Header().Set("Content-Type", m.ContentType)
	w.Header().Set("Content-Length", strconv.FormatUint(info.Size, 10))
	w.WriteHeader(http.StatusOK)
	if _, err := io.Copy(w, obj); err != nil && r.Context().Err() == nil {
		s.log.Warn("stream object", "file_id", fileID, "err", err)
	}
}

// loadMeta reads the metadata of fileID, writing 404 or 503 when it cannot.
func (s *Service) loadMeta(ctx context.Context, w http.ResponseWriter, st *state, fileID string) (meta, uint64, bool) {
	e, err := st.kv.Get(ctx, metaKey(fileID))
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		api.WriteError(w, http.StatusNotFound, api.CodeNotFound, "file not found")
		return meta{}, 0, false
	}
	if err != nil {
		s.log.Error("load file meta", "file_id", fileID, "err", err)
		api.WriteError(w, http.StatusServiceUnavailable, api.CodeUnavailable, "file store unavailable")
		return meta{}, 0, false
	}
	var m meta
	if err := json.Unmarshal(e.Value(), &m); err != nil {
		s.log.Error("decode file meta", "file_id", fileID, "err", err)
		api.WriteError(w, http.StatusInternalServerError, api.CodeInternal, "internal error")
		return meta{}, 0, false
	}
	return m, e.Revision(), true
}

// checkSignature verifies op, exp and sig of a blob URL and returns its
// file id, writing 403 (or 400 for a malformed id) when they do not hold.
func (s *Service) checkSignature(w http.ResponseWriter, r *http.Request, key []byte, op string) (string, bool) {
	fileID := chi.URLParam(r, "fileId")
	if !fileIDRE.MatchString(fileID) {
		api.WriteError(w, http.StatusBadRequest, api.CodeBadRequest, "malformed file id")
		return "", false
	}
	q := r.URL.Query()
	exp, err := strconv.ParseInt(q.Get("exp"), 10, 64)
	sig, herr := hex.DecodeString(q.Get("sig"))
	if q.Get("op") != op || err != nil || herr != nil ||
		!hmac.Equal(sig, sign(key, op, fileID, exp)) {
		api.WriteError(w, http.StatusForbidden, api.CodeForbidden, "invalid signature")
		return "", false
	}
	if s.cfg.Now().Unix() > exp {
		api.WriteError(w, http.StatusForbidden, api.CodeForbidden, "url expired")
		return "", false
	}
	return fileID, true
}

// signedURL returns the absolute blob URL for op on fileID, valid for
// URLExpiry, with the base derived from the request.
func (s *Service) signedURL(r *http.Request, key []byte, op, fileID string) string {
	exp := s.cfg.Now().Add(s.cfg.URLExpiry).Unix()
	q := url.Values{}
	q.Set("op", op)
	q.Set("exp", strconv.FormatInt(exp, 10))
	q.Set("sig", hex.EncodeToString(sign(key, op, fileID, exp)))
	u := url.URL{
		Scheme:   requestScheme(r),
		Host:     requestHost(r),
		Path:     "/assets/blob/" + fileID,
		RawQuery: q.Encode(),
	}
	return u.String()
}

// sign is the HMAC-SHA256 of op, file id and expiry.
func sign(key []byte, op, fileID string, exp int64) []byte {
	mac := hmac.New(sha256.New, key)
	mac.Write([]byte(op + "\n" + fileID + "\n" + strconv.FormatInt(exp, 10)))
	return mac.Sum(nil)
}

func requestScheme(r *http.Request) string {
	if p := firstForwarded(r.Header.Get("X-Forwarded-Proto")); p == "http" || p == "https" {
		return p
	}
	if r.TLS != nil {
		return "https"
	}
	return "http"
}

func requestHost(r *http.Request) string {
	if h := firstForwarded(r.Header.Get("X-Forwarded-Host")); h != "" {
		return h
	}
	return r.Host
}

// firstForwarded returns the first entry of a comma-separated forwarding
// header (the one the outermost proxy set).
func firstForwarded(v string) string {
	v, _, _ = strings.Cut(v, ",")
	return strings.ToLower(strings.TrimSpace(v))
}

// newFileID returns 24 lowercase hex characters shaped like the seed's Mongo
// ObjectId: 4 bytes of Unix seconds, then 8 random bytes.
func newFileID(now time.Time) (string, error) {
	var b [12]byte
	binary.BigEndian.PutUint32(b[:4], uint32(now.Unix()))
	if _, err := rand.Read(b[4:]); err != nil {
		return "", fmt.Errorf("read random: %w", err)
	}
	return hex.EncodeToString(b[:]), nil
}

func contentType(ext string) string {
	if t := mime.TypeByExtension(strings.ToLower(ext)); t != "" {
		return t
	}
	return "application/octet-stream"
}

func metaKey(fileID string) string { return "f." + fileID }
