package main

import (
	"bytes"
	"io"
	"net/http"
	"testing"
)

// Upload and download a file through the seed's presigned-URL flow.
func TestAssetsEndToEnd(t *testing.T) {
	s := startServer(t, t.TempDir())
	ka := login(t, s, "alice", "d1")
	kb := login(t, s, "bob", "d1")
	var up struct {
		URL    string `json:"url"`
		FileID string `json:"fileId"`
	}
	if code := call(t, "GET", s.URL+"/v1.0/assets/upload/presigned_url?ext=.png&category=chat", authHeaders("alice", ka), nil, &up); code != 200 || up.URL == "" || len(up.FileID) != 24 {
		t.Fatalf("upload url: %d %+v", code, up)
	}
	payload := bytes.Repeat([]byte("png!"), 10000)
	req, _ := http.NewRequest("PUT", up.URL, bytes.NewReader(payload))
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("upload: %v %v", err, resp)
	}
	resp.Body.Close()
	if code := call(t, "PUT", s.URL+"/v1.0/assets/"+up.FileID+"/status", authHeaders("alice", ka), map[string]any{"status": true}, nil); code != 200 {
		t.Fatalf("status: %d", code)
	}
	var down struct {
		URL string `json:"url"`
	}
	if code := call(t, "GET", s.URL+"/file/download/"+up.FileID+"/presigned_url", authHeaders("bob", kb), nil, &down); code != 200 || down.URL == "" {
		t.Fatalf("download url: %d %+v", code, down)
	}
	resp, err = http.Get(down.URL)
	if err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !bytes.Equal(got, payload) || resp.Header.Get("Content-Type") != "image/png" {
		t.Fatalf("download: %d %s, %d bytes", resp.StatusCode, resp.Header.Get("Content-Type"), len(got))
	}
}
