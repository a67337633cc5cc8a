package schema

import (
	"errors"
	"reflect"
	"strings"
	"testing"
)

func TestDecodeJSON(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want *Message
	}{
		{
			name: "v2.1 seed example; head.from and top-level meta ignored",
			in:   `{"_v":2.1,"id":"m1","head":{"type":"INDIVIDUAL","to":"bob","from":"alice","chatid":"c1","contentType":"text","action":"message"},"meta":{"createdAt":123},"body":{"text":"hi"}}`,
			want: &Message{Version: 2.1, ID: "m1", Type: TypeMessage, Channel: ChannelIndividual, Destination: "bob",
				Content: []byte(`{"text":"hi"}`), Meta: map[string]string{"chatid": "c1", "contentType": "text", "action": "message"}},
		},
		{
			name: "v2.0 group without ephemeral",
			in:   `{"_v":2.0,"id":"m2","head":{"type":"group","to":"g1","contentType":"text"},"body":{"text":"yo"}}`,
			want: &Message{Version: 2, ID: "m2", Type: TypeMessage, Channel: ChannelGroup, Destination: "g1",
				Content: []byte(`{"text":"yo"}`), Meta: map[string]string{"contentType": "text"}},
		},
		{
			name: "missing head.type and contentType default to INDIVIDUAL MESSAGE",
			in:   `{"_v":2.1,"id":"m","head":{"to":"bob"},"body":{}}`,
			want: &Message{Version: 2.1, ID: "m", Type: TypeMessage, Channel: ChannelIndividual, Destination: "bob", Content: []byte(`{}`)},
		},
		{
			name: "README aliases and null means absent",
			in:   `{"_v":2.1,"id":"m","head":{"type":"chat","to":"bob","contentType":null,"ephemeral":null,"x":null}}`,
			want: &Message{Version: 2.1, ID: "m", Type: TypeMessage, Channel: ChannelIndividual, Destination: "bob"},
		},
		{
			name: "bot means OTHER",
			in:   `{"_v":2.1,"id":"m","head":{"type":"bot","to":"bob"}}`,
			want: &Message{Version: 2.1, ID: "m", Type: TypeMessage, Channel: ChannelOther, Destination: "bob"},
		},
		{
			name: "client ack by contentType any case, ephemeral bool",
			in:   `{"_v":2.1,"id":"m1","head":{"type":"INDIVIDUAL","to":"server","contentType":"client_ack","ephemeral":true},"body":{}}`,
			want: &Message{Version: 2.1, ID: "m1", Type: TypeClientAck, Channel: ChannelIndividual, Ephemeral: true,
				Destination: "server", Content: []byte(`{}`), Meta: map[string]string{"contentType": "client_ack"}},
		},
		{
			name: "notification contentType",
			in:   `{"_v":2.1,"id":"r1","head":{"type":"INDIVIDUAL","to":"bob","contentType":"NOTIFICATION","action":"state"},"body":{"ids":["m1"],"state":"read"}}`,
			want: &Message{Version: 2.1, ID: "r1", Type: TypeNotification, Channel: ChannelIndividual, Destination: "bob",
				Content: []byte(`{"ids":["m1"],"state":"read"}`), Meta: map[string]string{"contentType": "NOTIFICATION", "action": "state"}},
		},
		{
			name: "ephemeral as string in any case",
			in:   `{"_v":2.1,"id":"m","head":{"to":"bob","ephemeral":"TRUE"}}`,
			want: &Message{Version: 2.1, ID: "m", Type: TypeMessage, Channel: ChannelIndividual, Ephemeral: true, Destination: "bob"},
		},
		{
			name: "ephemeral false string",
			in:   `{"_v":2.1,"id":"m","head":{"to":"bob","ephemeral":"False"}}`,
			want: &Message{Version: 2.1, ID: "m", Type: TypeMessage, Channel: ChannelIndividual, Destination: "bob"},
		},
		{
			name: "head values of every JSON kind become meta strings",
			in:   `{"_v":2.1,"id":"m","head":{"to":"bob","n":5,"f":1.50,"t":true,"b":false,"o":{ "a" : [1, 2] },"a":[ ],"s":"x\u0041","e":""}}`,
			want: &Message{Version: 2.1, ID: "m", Type: TypeMessage, Channel: ChannelIndividual, Destination: "bob",
				Meta: map[string]string{"n": "5", "f": "1.50", "t": "true", "b": "false", "o": `{"a":[1,2]}`, "a": "[]", "s": "xA", "e": ""}},
		},
		{
			name: "string body is kept as JSON",
			in:   `{"_v":2.1,"id":"m","head":{"to":"bob"},"body":"hello"}`,
			want: &Message{Version: 2.1, ID: "m", Type: TypeMessage, Channel: ChannelIndividual, Destination: "bob", Content: []byte(`"hello"`)},
		},
		{
			name: "body is compacted",
			in:   "{\"_v\":2.1,\"id\":\"m\",\"head\":{\"to\":\"bob\"},\"body\":{ \"text\" :\t\"a b\" ,\n\"n\": [ 1 , 2 ] }}",
			want: &Message{Version: 2.1, ID: "m", Type: TypeMessage, Channel: ChannelIndividual, Destination: "bob", Content: []byte(`{"text":"a b","n":[1,2]}`)},
		},
		{
			name: "_v as numeric string, 3.0",
			in:   `{"_v":"3.0","id":"m","head":{"to":"bob"}}`,
			want: &Message{Version: 3, ID: "m", Type: TypeMessage, Channel: ChannelIndividual, Destination: "bob"},
		},
		{
			name: "no head at all",
			in:   `{"_v":2.1,"id":"m"}`,
			want: &Message{Version: 2.1, ID: "m", Type: TypeMessage, Channel: ChannelIndividual},
		},
		{
			name: "duplicate keys: last wins",
			in:   `{"_v":2.1,"id":"a","id":"b","head":{"to":"x","to":"y"}}`,
			want: &Message{Version: 2.1, ID: "b", Type: TypeMessage, Channel: ChannelIndividual, Destination: "y"},
		},
		{
			name: "v1 with state",
			in:   `{"msgId":"m3","from":"mallory","to":"bob","chatId":"c1","text":"hi","type":"text","chatType":"INDIVIDUAL","action":"message","state":"new"}`,
			want: &Message{Version: 1, ID: "m3", Type: TypeMessage, Channel: ChannelIndividual, Destination: "bob", Content: []byte(`{"text":"hi"}`),
				Meta: map[string]string{"chatid": "c1", "contentType": "text", "action": "message", "state": "new"}},
		},
		{
			name: "v1 without state, module, lowercase chatid",
			in:   `{"_v":1,"msgId":"m4","to":"g1","chatid":"g1","text":"hi","type":"notification","module":"group"}`,
			want: &Message{Version: 1, ID: "m4", Type: TypeNotification, Channel: ChannelGroup, Destination: "g1", Content: []byte(`{"text":"hi"}`),
				Meta: map[string]string{"chatid": "g1", "contentType": "notification"}},
		},
		{
			name: "v1 empty chatType falls back to module, _v below 2",
			in:   `{"_v":1.5,"msgId":"m","to":"bob","chatType":"","module":"OTHER"}`,
			want: &Message{Version: 1, ID: "m", Type: TypeMessage, Channel: ChannelOther, Destination: "bob", Content: []byte(`{}`)},
		},
		{
			name: "v1 non-string text and numeric state",
			in:   `{"_v":0,"msgId":"m","to":"bob","text":{"a": 1},"state":2}`,
			want: &Message{Version: 1, ID: "m", Type: TypeMessage, Channel: ChannelIndividual, Destination: "bob", Content: []byte(`{"text":{"a":1}}`),
				Meta: map[string]string{"state": "2"}},
		},
		{
			name: "v1 empty object",
			in:   `{}`,
			want: &Message{Version: 1, Type: TypeMessage, Channel: ChannelIndividual, Content: []byte(`{}`)},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := DecodeJSON([]byte(tt.in))
			if err != nil {
				t.Fatalf("DecodeJSON: %v", err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("got  %#v\nwant %#v", got, tt.want)
			}
		})
	}
}

func TestDecodeJSONErrors(t *testing.T) {
	long := strings.Repeat("x", 200)
	tests := []struct {
		name   string
		in     string
		code   string
		wantID string
	}{
		{"not json", `hello`, CodeMalformed, ""},
		{"ping", `ping`, CodeMalformed, ""},
		{"truncated", `{"_v":2.1,"id":"m"`, CodeMalformed, ""},
		{"array", `[{"_v":2.1}]`, CodeMalformed, ""},
		{"string", `"x"`, CodeMalformed, ""},
		{"null", `null`, CodeMalformed, ""},
		{"empty", ``, CodeMalformed, ""},
		{"invalid utf-8", "{\"_v\":2.1,\"id\":\"m\xff\"}", CodeMalformed, ""},
		{"trailing garbage", `{"_v":2.1} x`, CodeMalformed, ""},
		{"_v not a number", `{"_v":true,"id":"m"}`, CodeMalformed, ""},
		{"_v non-numeric string", `{"_v":"two","id":"m"}`, CodeMalformed, ""},
		{"head not an object", `{"_v":2.1,"id":"m1","head":"x"}`, CodeMalformed, "m1"},
		{"head array", `{"_v":2.1,"id":"m1","head":[]}`, CodeMalformed, "m1"},
		{"id a number", `{"_v":2.1,"id":5,"head":{"to":"bob"}}`, CodeBadID, ""},
		{"v1 msgId a number", `{"msgId":5,"to":"bob"}`, CodeBadID, ""},
		{"unknown head.type", `{"_v":2.1,"id":"m1","head":{"type":"broadcast","to":"bob"}}`, CodeBadChannel, "m1"},
		{"head.type a number", `{"_v":2.1,"id":"m1","head":{"type":1,"to":"bob"}}`, CodeBadChannel, "m1"},
		{"unknown v1 chatType", `{"msgId":"m1","chatType":"x","to":"bob"}`, CodeBadChannel, "m1"},
		{"v1 module an object", `{"msgId":"m1","module":{},"to":"bob"}`, CodeBadChannel, "m1"},
		{"v1 chatType a bool", `{"msgId":"m1","chatType":true,"to":"bob"}`, CodeBadChannel, "m1"},
		{"contentType a number", `{"_v":2.1,"id":"m1","head":{"to":"bob","contentType":3}}`, CodeBadType, "m1"},
		{"v1 type an array", `{"msgId":"m1","to":"bob","type":[]}`, CodeBadType, "m1"},
		{"ephemeral yes", `{"_v":2.1,"id":"m1","head":{"to":"bob","ephemeral":"yes"}}`, CodeBadEphemeral, "m1"},
		{"ephemeral number", `{"_v":2.1,"id":"m1","head":{"to":"bob","ephemeral":1}}`, CodeBadEphemeral, "m1"},
		{"to a number", `{"_v":2.1,"id":"m1","head":{"to":42}}`, CodeBadTo, "m1"},
		{"v1 to an object", `{"msgId":"m1","to":{}}`, CodeBadTo, "m1"},
		{"invalid id is not echoed", `{"_v":2.1,"id":"` + long + `","head":{"type":"x"}}`, CodeBadChannel, ""},
		{"id with space is not echoed", `{"_v":2.1,"id":"a b","head":{"to":1}}`, CodeBadTo, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, err := DecodeJSON([]byte(tt.in))
			if err == nil {
				t.Fatalf("DecodeJSON = %#v, want error %q", m, tt.code)
			}
			var de *DecodeError
			if !errors.As(err, &de) {
				t.Fatalf("error %T %v is not a *DecodeError", err, err)
			}
			if de.Code != tt.code || de.ID != tt.wantID {
				t.Fatalf("got code %q id %q, want code %q id %q", de.Code, de.ID, tt.code, tt.wantID)
			}
			if de.Reason == "" || len(de.Error()) > 200 {
				t.Fatalf("bad error text %q", de.Error())
			}
		})
	}
}

func TestValidate(t *testing.T) {
	long := strings.Repeat("m", MaxMessageIDLen+1)
	tests := []struct {
		name   string
		m      Message
		code   string // "" means valid
		wantID string
	}{
		{"chat message", Message{ID: "m1", Type: TypeMessage, Channel: ChannelIndividual, Destination: "bob"}, "", ""},
		{"phone number destination", Message{ID: "m1", Type: TypeMessage, Channel: ChannelIndividual, Destination: "+919999999999"}, "", ""},
		{"group message", Message{ID: "m1", Type: TypeMessage, Channel: ChannelGroup, Destination: "0f8fad5b-d9cb-469f-a165-70867728950e"}, "", ""},
		{"notification", Message{ID: "r1", Type: TypeNotification, Channel: ChannelIndividual, Destination: "bob"}, "", ""},
		{"custom to other", Message{ID: "c1", Type: TypeCustom, Channel: ChannelOther, Destination: "bot_1"}, "", ""},
		{"unknown channel routes as user", Message{ID: "c1", Type: TypeMessage, Channel: ChannelUnknown, Destination: "bob"}, "", ""},
		{"client ack to server", Message{ID: "m1", Type: TypeClientAck, Destination: "server"}, "", ""},
		{"client ack without destination", Message{ID: "m1", Type: TypeClientAck, Channel: ChannelGroup}, "", ""},
		{"missing id", Message{Type: TypeMessage, Destination: "bob"}, CodeMissingID, ""},
		{"id with space", Message{ID: "m 1", Type: TypeMessage, Destination: "bob"}, CodeBadID, ""},
		{"id too long", Message{ID: long, Type: TypeMessage, Destination: "bob"}, CodeBadID, ""},
		{"id with control char", Message{ID: "m\x00", Type: TypeMessage, Destination: "bob"}, CodeBadID, ""},
		{"server ack from client", Message{ID: "m1", Type: TypeServerAck, Destination: "bob"}, CodeBadType, "m1"},
		{"unknown type number", Message{ID: "m1", Type: 7, Destination: "bob"}, CodeBadType, "m1"},
		{"unknown channel number", Message{ID: "m1", Type: TypeMessage, Channel: 5, Destination: "bob"}, CodeBadChannel, "m1"},
		{"client ack to a user", Message{ID: "m1", Type: TypeClientAck, Destination: "bob"}, CodeBadTo, "m1"},
		{"missing destination", Message{ID: "m1", Type: TypeMessage, Channel: ChannelIndividual}, CodeMissingTo, "m1"},
		{"destination with dot", Message{ID: "m1", Type: TypeMessage, Destination: "bob.x"}, CodeBadTo, "m1"},
		{"destination wildcard", Message{ID: "m1", Type: TypeMessage, Destination: ">"}, CodeBadTo, "m1"},
		{"destination server", Message{ID: "m1", Type: TypeMessage, Destination: "server"}, CodeBadTo, "m1"},
		{"group id with space", Message{ID: "m1", Type: TypeMessage, Channel: ChannelGroup, Destination: "g 1"}, CodeBadTo, "m1"},
		{"destination too long", Message{ID: "m1", Type: TypeMessage, Destination: strings.Repeat("b", MaxIDLen+1)}, CodeBadTo, "m1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.m.Validate()
			if tt.code == "" {
				if err != nil {
					t.Fatalf("Validate = %v, want nil", err)
				}
				return
			}
			var de *DecodeError
			if !errors.As(err, &de) {
				t.Fatalf("Validate = %v, want *DecodeError %q", err, tt.code)
			}
			if de.Code != tt.code || de.ID != tt.wantID {
				t.Fatalf("got code %q id %q, want code %q id %q", de.Code, de.ID, tt.code, tt.wantID)
			}
		})
	}
}

func TestStamp(t *testing.T) {
	tests := []struct {
		name          string
		clientTS      uint64
		wantTimestamp uint64
	}{
		{"json input gets the server time", 0, 1000},
		{"client timestamp is kept", 17, 17},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := &Message{Source: "mallory", Timestamp: tt.clientTS, ServerID: "client-chosen", ServerTimestamp: 5}
			m.Stamp("alice", "sid", 1000)
			want := &Message{Source: "alice", Timestamp: tt.wantTimestamp, ServerID: "sid", ServerTimestamp: 1000}
			if !reflect.DeepEqual(m, want) {
				t.Fatalf("got %#v, want %#v", m, want)
			}
		})
	}
}
