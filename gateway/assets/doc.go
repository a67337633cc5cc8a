// Package assets serves file uploads and downloads (the seed's file-ms,
// seed-spec §5.2.4 and §9) from a NATS Object Store instead of S3, keeping the
// seed's presigned-URL API shape.
//
// # What it owns
//
//   - Object Store bucket "assets": one object per file, named by its file id.
//   - KV bucket "assets_meta": key "f.<fileId>" holds the JSON metadata
//     {fileId, owner, category, contentType, createdAt, status}; key
//     "signing-key" holds the 32-byte HMAC key, created once with kv.Create so
//     every gateway sharing the JetStream domain signs and verifies alike.
//
// Setup creates both idempotently. No NATS subjects are consumed or published
// directly; all traffic goes through the KV and Object Store APIs. There is
// no Run: the service has no long-running work of its own, only HTTP handlers.
//
// # Routes (each also under "/file" instead of "/assets"; "/v1.0" is stripped by the root)
//
//	GET  /assets/upload/presigned_url?ext=.png&category=chat   auth → {"url","fileId"}
//	POST /assets/upload/presigned_url {"ext","category"}       auth, legacy → same
//	PUT  /assets/{fileId}/status {"status":true}               auth, owner only
//	GET  /assets/download/{fileId}/presigned_url               auth → {"url"}
//	PUT  /assets/blob/{fileId}?op=put&exp=<unix>&sig=<hex>     signed, no auth
//	GET  /assets/blob/{fileId}?op=get&exp=<unix>&sig=<hex>     signed, no auth
//
// The blob URLs play the part of S3 presigned URLs: sig is the hex
// HMAC-SHA256 of "op\nfileId\nexp" under the signing key, and the URL stops
// working after exp (Config.URLExpiry after it was issued). Their base
// (scheme and host) is taken from the request that asked for them, honouring
// X-Forwarded-Proto and X-Forwarded-Host from a reverse proxy. The upload
// body is streamed into the Object Store, capped at Config.MaxBytes.
//
// # Fixed relative to the seed
//
//   - category is validated (^[A-Za-z0-9_-]{1,32}$) and ext too
//     (^\.[A-Za-z0-9]{1,10}$); the seed put category unchecked into S3 keys.
//   - Uploads have a size limit (413 above MaxBytes); the seed had none.
//   - A download URL is only handed out once the owner has set status true
//     (404 before); the seed signed URLs for unfinished uploads.
//   - Setting status true requires the object to exist (409 otherwise), and
//     a completed file cannot be overwritten through an old upload URL (409).
//   - A malformed file id is a 400; the seed answered 500.
//   - Error bodies use the shared api.ErrorBody shape: the seed's
//     {"error":"file not found"} becomes {"status":false,"error":"not_found",
//     "message":"file not found"} (and "bad request" likewise).
//
// # Concurrency
//
// Handlers are safe for concurrent use and may run on any number of gateways
// at once. The status update is a compare-and-set on the metadata revision,
// so of two concurrent "status true" requests one wins and the other gets
// the seed's 400 "already true" answer. Handlers answer 503 until Setup has
// succeeded.
package assets
