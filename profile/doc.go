// Package profile owns login, access keys, devices and their push tokens,
// user profiles and contact-book sync.
//
// # Login and access keys
//
// POST /login verifies a login token with the configured TokenVerifier
// (Firebase ID tokens in production, DevVerifier in development and tests).
// With Config.BindUsername the requested username must be the token's phone
// number (E.164, with or without the leading "+") or its uid: the seed let
// any token holder log in as anyone. Each login issues a new access key for
// the (user, device) pair: 32 bytes from crypto/rand, base64url without
// padding. Only its SHA-256 is stored. The key replaces that device's
// previous key; other devices' keys stay valid. Authenticate hashes the
// presented key and compares it with every device of the user with
// crypto/subtle.ConstantTimeCompare.
//
// # Storage
//
// Everything lives in one bbolt file (Config.Path), opened with a lock
// timeout so a second process gets a clear error instead of hanging:
//
//	bucket "users"    key <user>              → JSON {username, uid, name?, addedOn, isActive, syncAt?}
//	bucket "devices"  key <user> 0x00 <device> → JSON {keyHash (SHA-256, base64), pushToken, messageVersion, addedOn, lastLogin}
//	bucket "meta"     key "version"           → schema version ("1")
//
// Keys are only ever built from ids that passed schema.UserID.Valid and
// schema.DeviceID.Valid, which never contain 0x00, so a prefix scan of
// "<user>\x00" lists exactly that user's devices. Every write is a single
// bbolt Update transaction (one fsync).
//
// Future work: DESIGN.md §5 describes several profile replicas that apply a
// JetStream stream (PROFILE, profile.events.<uid>) to their own bbolt files.
// This package is the single-replica form: one process owns the file, and
// the micro service below is how other processes reach it.
//
// # Subjects
//
// Published (core NATS, fire and forget, only when Config.NC is set):
// schema.Kick(user, device) with {"reason":"key_replaced"} when a login
// replaces a device's key and {"reason":"logout"} on logout, so the delivery
// service closes that device's sockets.
//
// Served by Run, as the nats micro service "profile" (queue group "q"):
//
//	profile.auth          {"user","accesskey"}       → {"user","device"}, or micro error "401"
//	profile.devices       {"user"}                   → [Device…]
//	profile.token.remove  {"user","device","token"}  → {"status":true}
//
// Client is the thin NATS client for those endpoints (split mode).
//
// # HTTP routes (registered by Routes, without the /v1.0 prefix)
//
//	POST /login                                   no auth
//	POST /logout                                  auth
//	GET  /profile/, /profile/get                  auth
//	POST /contactbook/sync, /profile/contactbook/sync, /profile/user/sync   auth
//	PUT  /profile/devices/{deviceId}/token        auth, own device only
//	GET  /profile/devices                         auth
//
// Every error is a JSON api.ErrorBody.
//
// # Concurrency
//
// Service is safe for concurrent use. bbolt serialises writers; readers run
// in parallel. The micro endpoints handle one request at a time per endpoint
// and process (each is a short bbolt transaction). Run must have returned
// before Close is called.
package profile
