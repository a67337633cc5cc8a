package schema

// Membership is one user's membership history in one group, as the groups
// service records it for delivery: which messages of the group's GROUP_LOG
// subject the user may receive.
type Membership struct {
	Group GroupID `json:"group"`
	// Epochs are the periods of membership, oldest first. A user who left
	// and was added again has several; the last is open while the user is a
	// member.
	Epochs []Epoch `json:"epochs"`
}

// Epoch is one period of membership in GROUP_LOG sequences: the member
// receives the group's messages with Since < seq, and seq < Until when
// Until is not 0 (the member was removed: the first sequence after the
// removal). Since is the last sequence of the group's subject when the
// member was added (0: the subject was empty).
type Epoch struct {
	Since uint64 `json:"since"`
	Until uint64 `json:"until,omitempty"`
}

// Open reports whether the epoch has not ended.
func (e Epoch) Open() bool { return e.Until == 0 }

// Contains reports whether a message at seq was sent during e.
func (e Epoch) Contains(seq uint64) bool {
	return seq > e.Since && (e.Until == 0 || seq < e.Until)
}

// Visible reports whether the message at seq was sent while the user was a
// member.
func (m *Membership) Visible(seq uint64) bool {
	for _, e := range m.Epochs {
		if e.Contains(seq) {
			return true
		}
	}
	return false
}

// Current reports whether the user is a member now.
func (m *Membership) Current() bool {
	return len(m.Epochs) > 0 && m.Epochs[len(m.Epochs)-1].Open()
}

// Start is the sequence after which the first visible message can be.
func (m *Membership) Start() uint64 {
	if len(m.Epochs) == 0 {
		return 0
	}
	return m.Epochs[0].Since
}

// End is the first sequence after the last visible one, or 0 while the user
// is a member.
func (m *Membership) End() uint64 {
	if len(m.Epochs) == 0 {
		return 0
	}
	return m.Epochs[len(m.Epochs)-1].Until
}
