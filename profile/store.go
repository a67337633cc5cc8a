package profile

import (
	"bytes"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"

	"github.com/vartalap/vartalap/schema"
)

// Bucket names and the schema version of the bbolt file.
var (
	bucketUsers   = []byte("users")
	bucketDevices = []byte("devices")
	bucketMeta    = []byte("meta")
	keyVersion    = []byte("version")
)

const storeVersion = "1"

// errNoDevice means the (user, device) pair has no record.
var errNoDevice = errors.New("no such device")

// userRecord is the JSON value in bucket "users".
type userRecord struct {
	Username string    `json:"username"`
	UID      string    `json:"uid"`
	Name     string    `json:"name,omitempty"`
	AddedOn  time.Time `json:"addedOn"`
	IsActive bool      `json:"isActive"`
	SyncAt   time.Time `json:"syncAt,omitzero"`
}

// deviceRecord is the JSON value in bucket "devices".
type deviceRecord struct {
	KeyHash        []byte    `json:"keyHash"` // SHA-256 of the access key
	PushToken      string    `json:"pushToken,omitempty"`
	MessageVersion float64   `json:"messageVersion"`
	AddedOn        time.Time `json:"addedOn"`
	LastLogin      time.Time `json:"lastLogin"`
}

// store wraps the bbolt file. Every id it receives has passed Valid.
type store struct {
	db *bolt.DB
}

func openStore(path string, timeout time.Duration) (*store, error) {
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: timeout})
	if err != nil {
		if errors.Is(err, bolterrors.ErrTimeout) {
			return nil, fmt.Errorf("open profile db %s: locked by another process: %w", path, err)
		}
		return nil, fmt.Errorf("open profile db %s: %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, name := range [][]byte{bucketUsers, bucketDevices, bucketMeta} {
			if _, err := tx.CreateBucketIfNotExists(name); err != nil {
				return fmt.Errorf("create bucket %s: %w", name, err)
			}
		}
		meta := tx.Bucket(bucketMeta)
		switch v := meta.Get(keyVersion); {
		case v == nil:
			return meta.Put(keyVersion, []byte(storeVersion))
		case string(v) != storeVersion:
			return fmt.Errorf("unsupported profile db version %q (want %q)", v, storeVersion)
		}
		return nil
	})
	if err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("init profile db %s: %w", path, err)
	}
	return &store{db: db}, nil
}

func (st *store) close() error { return st.db.Close() }

func devicePrefix(u schema.UserID) []byte {
	return append([]byte(u), 0)
}

func deviceKey(u schema.UserID, d schema.DeviceID) []byte {
	return append(devicePrefix(u), d...)
}

func hashKey(key string) []byte {
	h := sha256.Sum256([]byte(key))
	return h[:]
}

func getJSON(b *bolt.Bucket, key []byte, v any) (bool, error) {
	raw := b.Get(key)
	if raw == nil {
		return false, nil
	}
	if err := json.Unmarshal(raw, v); err != nil {
		return false, fmt.Errorf("decode record %q: %w", key, err)
	}
	return true, nil
}

func putJSON(b *bolt.Bucket, key []byte, v any) error {
	raw, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return b.Put(key, raw)
}

// loginParams is one successful login.
type loginParams struct {
	user           schema.UserID
	device         schema.DeviceID
	uid            string
	keyHash        []byte
	pushToken      string
	messageVersion float64
	now            time.Time
}

// login creates the profile if needed and stores the device with its new key
// hash. It reports whether the profile is new and whether a previous key of
// the device was replaced.
func (st *store) login(p loginParams) (isNew, replaced bool, err error) {
	err = st.db.Update(func(tx *bolt.Tx) error {
		users := tx.Bucket(bucketUsers)
		var u userRecord
		found, err := getJSON(users, []byte(p.user), &u)
		if err != nil {
			return err
		}
		if !found {
			isNew = true
			u = userRecord{Username: string(p.user), UID: p.uid, AddedOn: p.now, IsActive: true}
			if err := putJSON(users, []byte(p.user), u); err != nil {
				return err
			}
		}
		devices := tx.Bucket(bucketDevices)
		key := deviceKey(p.user, p.device)
		var d deviceRecord
		found, err = getJSON(devices, key, &d)
		if err != nil {
			return err
		}
		if !found {
			d.AddedOn = p.now
		}
		replaced = len(d.KeyHash) > 0
		d.KeyHash = p.keyHash
		d.PushToken = p.pushToken
		d.MessageVersion = p.messageVersion
		d.LastLogin = p.now
		return putJSON(devices, key, d)
	})
	if err != nil {
		return false, false, fmt.Errorf("store login of %s/%s: %w", p.user, p.device, err)
	}
	return isNew, replaced, nil
}

// logout deletes the device record (key hash and push token), if any.
func (st *store) logout(u schema.UserID, d schema.DeviceID) error {
	err := st.db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketDevices).Delete(deviceKey(u, d))
	})
	if err != nil {
		return fmt.Errorf("delete device %s/%s: %w", u, d, err)
	}
	return nil
}

// eachDevice calls fn for every device record of u, in device id order,
// inside a read transaction.
func (st *store) eachDevice(u schema.UserID, fn func(id schema.DeviceID, d *deviceRecord)) error {
	return st.db.View(func(tx *bolt.Tx) error {
		prefix := devicePrefix(u)
		c := tx.Bucket(bucketDevices).Cursor()
		for k, v := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, v = c.Next() {
			var d deviceRecord
			if err := json.Unmarshal(v, &d); err != nil {
				return fmt.Errorf("decode device record %q: %w", k, err)
			}
			fn(schema.DeviceID(k[len(prefix):]), &d)
		}
		return nil
	})
}

// authenticate returns the device whose stored hash matches keyHash.
func (st *store) authenticate(u schema.UserID, keyHash []byte) (schema.DeviceID, bool, error) {
	var (
		dev   schema.DeviceID
		found bool
	)
	err := st.eachDevice(u, func(id schema.DeviceID, d *deviceRecord) {
		// Every device is compared, so the time taken does not depend on
		// which one matches.
		if subtle.ConstantTimeCompare(d.KeyHash, keyHash) == 1 && !found {
			dev, found = id, true
		}
	})
	if err != nil {
		return "", false, fmt.Errorf("authenticate %s: %w", u, err)
	}
	return dev, found, nil
}

// devices lists the devices of u, ordered by device id.
func (st *store) devices(u schema.UserID) ([]Device, error) {
	out := []Device{}
	err := st.eachDevice(u, func(id schema.DeviceID, d *deviceRecord) {
		out = append(out, Device{
			ID:             id,
			PushToken:      d.PushToken,
			MessageVersion: d.MessageVersion,
			AddedOn:        d.AddedOn,
			LastLogin:      d.LastLogin,
		})
	})
	if err != nil {
		return nil, fmt.Errorf("list devices of %s: %w", u, err)
	}
	return out, nil
}

// setToken sets the push token of an existing device. When onlyIf is not
// nil, the token is changed only if the current one equals *onlyIf.
func (st *store) setToken(u schema.UserID, d schema.DeviceID, token string, onlyIf *string) error {
	err := st.db.Update(func(tx *bolt.Tx) error {
		devices := tx.Bucket(bucketDevices)
		key := deviceKey(u, d)
		var rec deviceRecord
		found, err := getJSON(devices, key, &rec)
		if err != nil {
			return err
		}
		if !found {
			return errNoDevice
		}
		if onlyIf != nil && rec.PushToken != *onlyIf {
			return nil
		}
		if rec.PushToken == token {
			return nil
		}
		rec.PushToken = token
		return putJSON(devices, key, rec)
	})
	if err != nil {
		return fmt.Errorf("set push token of %s/%s: %w", u, d, err)
	}
	return nil
}

// profile returns the profile of u.
func (st *store) profile(u schema.UserID) (userRecord, bool, error) {
	var rec userRecord
	var found bool
	err := st.db.View(func(tx *bolt.Tx) error {
		var err error
		found, err = getJSON(tx.Bucket(bucketUsers), []byte(u), &rec)
		return err
	})
	if err != nil {
		return userRecord{}, false, fmt.Errorf("load profile %s: %w", u, err)
	}
	return rec, found, nil
}

// syncContacts returns which of users have an active profile and records
// the caller's sync time, in one transaction.
func (st *store) syncContacts(caller schema.UserID, users []schema.UserID, now time.Time) (map[schema.UserID]bool, error) {
	out := make(map[schema.UserID]bool)
	err := st.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketUsers)
		for _, u := range users {
			if out[u] {
				continue
			}
			var rec userRecord
			found, err := getJSON(b, []byte(u), &rec)
			if err != nil {
				return err
			}
			if found && rec.IsActive {
				out[u] = true
			}
		}
		var me userRecord
		found, err := getJSON(b, []byte(caller), &me)
		if err != nil || !found {
			return err
		}
		me.SyncAt = now
		return putJSON(b, []byte(caller), me)
	})
	if err != nil {
		return nil, fmt.Errorf("sync contacts of %s: %w", caller, err)
	}
	return out, nil
}
