// Package webclient holds the browser chat client the gateway serves at "/":
// one static page (index.html, app.js, style.css) in plain HTML, CSS and ES
// modules, with no build step, no framework and nothing fetched from outside
// the server's own origin. It succeeds the seed's www/ test page.
//
// The page talks to the server only through the public wire contract, all
// under the seed's "/v1.0" prefix: POST /login and /logout, GET and POST
// /groups/, and the WebSocket /wss/?format=text&ack=true with JSON v2.1
// frames. It authenticates with the `user` and `accesskey` cookies (and the
// same headers on fetch calls), answers every delivered message with a
// CLIENT_ACK, de-duplicates deliveries by message id (delivery is
// at-least-once), resends unacknowledged messages with the same id after a
// reconnect (the server stores a resend once), and sends delivery and read
// receipts (NOTIFICATION, action "state") to the sender.
//
// The package owns no subject, stream or goroutine; it only embeds files.
// e2e/chat.mjs drives two browsers against a running server.
package webclient

import (
	"embed"
	"io/fs"
)

//go:embed static
var static embed.FS

// FS returns the web client's files with index.html at the root, ready for
// http.FileServerFS.
func FS() fs.FS {
	sub, err := fs.Sub(static, "static")
	if err != nil {
		// fs.Sub fails only for an invalid path name; "static" is valid.
		panic("webclient: " + err.Error())
	}
	return sub
}
