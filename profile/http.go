package profile

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/vartalap/vartalap/internal/api"
	"github.com/vartalap/vartalap/schema"
)

// Limits on client input.
const (
	maxLoginBody     = 32 << 10 // login and token-update bodies
	maxPushTokenLen  = 4096
	maxLoginTokenLen = 16 << 10
	maxAccessKeyLen  = 256 // issued keys are 43 bytes
	defaultMsgVer    = 2.1
	accessKeyBytes   = 32
	codeMismatch     = "username_mismatch"
	kickKeyReplaced  = "key_replaced"
	kickLogout       = "logout"
)

// Routes registers the HTTP routes on r, without the /v1.0 prefix.
func (s *Service) Routes(r chi.Router) {
	r.Post("/login", s.handleLogin)
	r.Group(func(r chi.Router) {
		r.Use(api.RequireAuth(s, s.log))
		r.Post("/logout", s.handleLogout)
		r.Get("/profile/", s.handleProfile)
		r.Get("/profile/get", s.handleProfile)
		r.Post("/contactbook/sync", s.handleSync(false))
		r.Post("/profile/contactbook/sync", s.handleSync(true))
		r.Post("/profile/user/sync", s.handleSync(true))
		r.Get("/profile/devices", s.handleDevices)
		r.Put("/profile/devices/{deviceId}/token", s.handleSetToken)
	})
}

type loginRequest struct {
	Username          string   `json:"username"`
	AuthToken         string   `json:"authToken"`
	NotificationToken string   `json:"notificationToken"`
	DeviceID          string   `json:"deviceId"`
	MessageVersion    *float64 `json:"messageVersion"`
}

type loginResponse struct {
	Status    bool   `json:"status"`
	Username  string `json:"username"`
	AccessKey string `json:"accesskey"`
	IsNew     bool   `json:"isNew"`
}

func badRequest(w http.ResponseWriter, field, msg string) {
	api.WriteError(w, http.StatusBadRequest, api.CodeBadRequest, field+": "+msg)
}

func (s *Service) handleLogin(w http.ResponseWriter, r *http.Request) {
	var req loginRequest
	if !api.DecodeJSON(w, r, maxLoginBody, &req) {
		return
	}
	user := schema.UserID(req.Username)
	if req.Username == "" {
		badRequest(w, "username", "required")
		return
	}
	if !user.Valid() {
		badRequest(w, "username", "must be 1 to 64 letters, digits or _ - + @")
		return
	}
	device := schema.DefaultDevice
	if req.DeviceID != "" {
		device = schema.DeviceID(req.DeviceID)
	}
	if !device.Valid() {
		badRequest(w, "deviceId", "must be 1 to 64 letters, digits or _ - + @")
		return
	}
	if len(req.NotificationToken) > maxPushTokenLen {
		badRequest(w, "notificationToken", fmt.Sprintf("longer than %d bytes", maxPushTokenLen))
		return
	}
	msgVer := defaultMsgVer
	if req.MessageVersion != nil {
		msgVer = *req.MessageVersion
	}
	if msgVer <= 0 || msgVer > 100 {
		badRequest(w, "messageVersion", "must be a positive version number")
		return
	}

	token := req.AuthToken
	if token == "" {
		token = r.Header.Get("token")
	}
	if token == "" {
		api.WriteError(w, http.StatusUnauthorized, api.CodeUnauthenticated, "missing login token")
		return
	}
	if len(token) > maxLoginTokenLen {
		api.WriteError(w, http.StatusUnauthorized, api.CodeUnauthenticated, "invalid login token")
		return
	}
	claims, err := s.cfg.Verifier.Verify(r.Context(), token)
	if errors.Is(err, ErrBadToken) {
		s.log.Info("login rejected", "user", user, "device", device, "reason", "bad token", "err", err)
		api.WriteError(w, http.StatusUnauthorized, api.CodeUnauthenticated, "invalid login token")
		return
	}
	if err != nil {
		s.log.Error("login token verification error", "user", user, "err", err)
		api.WriteError(w, http.StatusServiceUnavailable, api.CodeUnavailable, "login token verification unavailable")
		return
	}
	if s.cfg.BindUsername && !usernameMatches(user, claims) {
		s.log.Info("login rejected", "user", user, "device", device, "reason", "username mismatch")
		api.WriteError(w, http.StatusUnauthorized, codeMismatch, "username does not match the login token")
		return
	}

	key, err := newAccessKey()
	if err != nil {
		s.log.Error("access key generation error", "err", err)
		api.WriteError(w, http.StatusInternalServerError, api.CodeInternal, "internal error")
		return
	}
	isNew, replaced, err := s.store.login(loginParams{
		user:           user,
		device:         device,
		uid:            claims.UID,
		keyHash:        hashKey(key),
		pushToken:      req.NotificationToken,
		messageVersion: msgVer,
		now:            s.now(),
	})
	if err != nil {
		s.log.Error("login store error", "user", user, "device", device, "err", err)
		api.WriteError(w, http.StatusInternalServerError, api.CodeInternal, "internal error")
		return
	}
	if replaced {
		s.kick(user, device, kickKeyReplaced)
	}
	s.log.Info("login", "user", user, "device", device, "is_new", isNew, "key_replaced", replaced)
	api.WriteJSON(w, http.StatusOK, loginResponse{Status: true, Username: string(user), AccessKey: key, IsNew: isNew})
}

// usernameMatches reports whether user is the token's phone number (with or
// without "+") or its uid.
func usernameMatches(user schema.UserID, c Claims) bool {
	u := string(user)
	if c.UID != "" && u == c.UID {
		return true
	}
	if c.Phone == "" {
		return false
	}
	return u == c.Phone || (strings.HasPrefix(c.Phone, "+") && u == c.Phone[1:])
}

func newAccessKey() (string, error) {
	b := make([]byte, accessKeyBytes)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("read random: %w", err)
	}
	return base64.RawURLEncoding.EncodeToString(b), nil
}

type kickMsg struct {
	Reason string `json:"reason"`
}

// kick tells the delivery service to close the sockets of (user, device).
func (s *Service) kick(user schema.UserID, device schema.DeviceID, reason string) {
	if s.cfg.NC == nil {
		return
	}
	data, err := json.Marshal(kickMsg{Reason: reason})
	if err == nil {
		err = s.cfg.NC.Publish(schema.Kick(user, device), data)
	}
	if err != nil {
		s.log.Error("kick publish error", "user", user, "device", device, "subject", schema.Kick(user, device), "err", err)
	}
}

func identity(w http.ResponseWriter, r *http.Request) (api.Identity, bool) {
	id, ok := api.IdentityFrom(r.Context())
	if !ok {
		api.WriteError(w, http.StatusUnauthorized, api.CodeUnauthenticated, "missing user or accesskey")
	}
	return id, ok
}

type statusResponse struct {
	Status bool `json:"status"`
}

func (s *Service) handleLogout(w http.ResponseWriter, r *http.Request) {
	id, ok := identity(w, r)
	if !ok {
		return
	}
	if err := s.store.logout(id.User, id.Device); err != nil {
		s.log.Error("logout store error", "user", id.User, "device", id.Device, "err", err)
		api.WriteError(w, http.StatusInternalServerError, api.CodeInternal, "internal error")
		return
	}
	s.kick(id.User, id.Device, kickLogout)
	s.log.Info("logout", "user", id.User, "device", id.Device)
	api.WriteJSON(w, http.StatusOK, statusResponse{Status: true})
}

type profileResponse struct {
	Username string `json:"username,omitempty"`
	Name     string `json:"name,omitempty"`
}

func (s *Service) handleProfile(w http.ResponseWriter, r *http.Request) {
	id, ok := identity(w, r)
	if !ok {
		return
	}
	rec, found, err := s.store.profile(id.User)
	if err != nil {
		s.log.Error("profile load error", "user", id.User, "err", err)
		api.WriteError(w, http.StatusInternalServerError, api.CodeInternal, "internal error")
		return
	}
	var resp profileResponse // seed: {} when there is no active profile
	if found && rec.IsActive {
		resp = profileResponse{Username: rec.Username, Name: rec.Name}
	}
	api.WriteJSON(w, http.StatusOK, resp)
}

type syncRequest struct {
	Users *[]string `json:"users"`
}

// handleSync serves contact-book sync. legacy routes treat a missing users
// field as an empty list; the current route requires it.
func (s *Service) handleSync(legacy bool) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		id, ok := identity(w, r)
		if !ok {
			return
		}
		var req syncRequest
		maxBody := int64(s.cfg.MaxContacts)*(schema.MaxIDLen*2+8) + 4096
		if !api.DecodeJSON(w, r, maxBody, &req) {
			return
		}
		if req.Users == nil && !legacy {
			badRequest(w, "users", "required")
			return
		}
		var names []string
		if req.Users != nil {
			names = *req.Users
		}
		if len(names) > s.cfg.MaxContacts {
			badRequest(w, "users", fmt.Sprintf("at most %d usernames per sync", s.cfg.MaxContacts))
			return
		}
		users := make([]schema.UserID, 0, len(names))
		for _, n := range names {
			if u := schema.UserID(n); u.Valid() {
				users = append(users, u)
			}
		}
		found, err := s.store.syncContacts(id.User, users, s.now())
		if err != nil {
			s.log.Error("contact sync error", "user", id.User, "err", err)
			api.WriteError(w, http.StatusInternalServerError, api.CodeInternal, "internal error")
			return
		}
		api.WriteJSON(w, http.StatusOK, found)
	}
}

type deviceView struct {
	ID             schema.DeviceID `json:"deviceId"`
	MessageVersion float64         `json:"messageVersion"`
	AddedOn        time.Time       `json:"addedOn"`
	LastLogin      time.Time       `json:"lastLogin"`
	HasToken       bool            `json:"hasToken"`
	Current        bool            `json:"current"`
}

func (s *Service) handleDevices(w http.ResponseWriter, r *http.Request) {
	id, ok := identity(w, r)
	if !ok {
		return
	}
	devs, err := s.store.devices(id.User)
	if err != nil {
		s.log.Error("device list error", "user", id.User, "err", err)
		api.WriteError(w, http.StatusInternalServerError, api.CodeInternal, "internal error")
		return
	}
	out := make([]deviceView, 0, len(devs))
	for _, d := range devs {
		out = append(out, deviceView{
			ID:             d.ID,
			MessageVersion: d.MessageVersion,
			AddedOn:        d.AddedOn,
			LastLogin:      d.LastLogin,
			HasToken:       d.PushToken != "",
			Current:        d.ID == id.Device,
		})
	}
	api.WriteJSON(w, http.StatusOK, out)
}

type tokenRequest struct {
	Token *string `json:"token"`
}

func (s *Service) handleSetToken(w http.ResponseWriter, r *http.Request) {
	id, ok := identity(w, r)
	if !ok {
		return
	}
	dev := chi.URLParam(r, "deviceId")
	if d, err := url.PathUnescape(dev); err == nil {
		dev = d
	}
	if schema.DeviceID(dev) != id.Device {
		api.WriteError(w, http.StatusForbidden, api.CodeForbidden, "a device may only update its own token")
		return
	}
	var req tokenRequest
	if !api.DecodeJSON(w, r, maxLoginBody, &req) {
		return
	}
	if req.Token == nil {
		badRequest(w, "token", "required")
		return
	}
	if len(*req.Token) > maxPushTokenLen {
		badRequest(w, "token", fmt.Sprintf("longer than %d bytes", maxPushTokenLen))
		return
	}
	err := s.store.setToken(id.User, id.Device, *req.Token, nil)
	if errors.Is(err, errNoDevice) {
		// Logged out between authentication and this write.
		api.WriteError(w, http.StatusUnauthorized, api.CodeUnauthenticated, "invalid user or accesskey")
		return
	}
	if err != nil {
		s.log.Error("push token update error", "user", id.User, "device", id.Device, "err", err)
		api.WriteError(w, http.StatusInternalServerError, api.CodeInternal, "internal error")
		return
	}
	api.WriteJSON(w, http.StatusOK, statusResponse{Status: true})
}
