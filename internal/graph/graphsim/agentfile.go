package graphsim

import (
	"bytes"
	"errors"
	"fmt"
	"slices"
	"strings"

	"go.yaml.in/yaml/v3"
)

// AgentJSON is an AgentSpec as the control API and agents files write it: answer is "accept",
// "decline" or "no-answer", talkTime a duration such as "30s".
type AgentJSON struct {
	ID           string `json:"id" yaml:"id"`
	DisplayName  string `json:"displayName,omitempty" yaml:"displayName"`
	Availability string `json:"availability,omitempty" yaml:"availability"`
	Activity     string `json:"activity,omitempty" yaml:"activity"`
	Answer       string `json:"answer,omitempty" yaml:"answer"`
	TalkTime     string `json:"talkTime,omitempty" yaml:"talkTime"`
}

func agentJSONOf(a AgentSpec) AgentJSON {
	return AgentJSON{ID: a.ID, DisplayName: a.DisplayName, Availability: a.Availability, Activity: a.Activity,
		Answer: a.Answer.String(), TalkTime: formatDuration(a.TalkTime)}
}

// Spec checks the entry and converts it. Presence values must be the documented ones
// (Available, Busy, ...; see Availabilities and Activities).
func (j AgentJSON) Spec() (AgentSpec, error) {
	if strings.TrimSpace(j.ID) == "" {
		return AgentSpec{}, errors.New("id (the agent's Entra object id) is required")
	}
	ans, err := ParseAgentAnswer(j.Answer)
	if err != nil {
		return AgentSpec{}, fmt.Errorf("answer: %w", err)
	}
	tt, err := parseDuration("talkTime", j.TalkTime)
	if err != nil {
		return AgentSpec{}, err
	}
	if j.Availability != "" || j.Activity != "" {
		av, ac := j.Availability, j.Activity
		if av == "" {
			av = "Available"
		}
		if ac == "" {
			ac = av
		}
		if err := checkPresence(av, ac); err != nil {
			return AgentSpec{}, err
		}
	}
	return AgentSpec{ID: j.ID, DisplayName: j.DisplayName, Availability: j.Availability, Activity: j.Activity,
		Answer: ans, TalkTime: tt}, nil
}

// ParseAgents reads an agents file: a YAML (or JSON) list of AgentJSON entries. Errors name the
// entry and its line.
func ParseAgents(data []byte) ([]AgentSpec, error) {
	if len(bytes.TrimSpace(data)) == 0 {
		return nil, nil
	}
	var nodes []yaml.Node
	if err := yaml.Unmarshal(data, &nodes); err != nil {
		return nil, fmt.Errorf("agents: %w (want a list of {id, displayName, availability, activity, answer, talkTime})", err)
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	var entries []AgentJSON
	if err := dec.Decode(&entries); err != nil {
		return nil, fmt.Errorf("agents: %w", err)
	}
	var (
		out  []AgentSpec
		errs []error
		seen = map[string]int{}
	)
	for i, e := range entries {
		line := nodes[i].Line
		a, err := e.Spec()
		if err != nil {
			errs = append(errs, fmt.Errorf("agents: entry %d (line %d): %w", i+1, line, err))
			continue
		}
		k := strings.ToLower(a.ID)
		if first, dup := seen[k]; dup {
			errs = append(errs, fmt.Errorf("agents: entry %d (line %d): agent %s is listed twice (first at entry %d)", i+1, line, a.ID, first))
			continue
		}
		seen[k] = i + 1
		out = append(out, a)
	}
	return out, errors.Join(errs...)
}

// Availabilities and Activities are the presence values Graph documents, PascalCase as they are
// sent (https://learn.microsoft.com/en-us/graph/api/resources/presence).
var (
	Availabilities = []string{"Available", "AvailableIdle", "Away", "BeRightBack", "Busy", "BusyIdle",
		"DoNotDisturb", "Offline", "PresenceUnknown"}
	Activities = []string{"Available", "Away", "BeRightBack", "Busy", "DoNotDisturb", "InACall",
		"InAConferenceCall", "Inactive", "InAMeeting", "Offline", "OffWork", "OutOfOffice", "PresenceUnknown",
		"Presenting", "UrgentInterruptionsOnly"}
)

// checkPresence accepts documented presence values only, spelled as Graph spells them.
func checkPresence(availability, activity string) error {
	if !slices.Contains(Availabilities, availability) {
		return fmt.Errorf("availability %q is not one of %s", availability, strings.Join(Availabilities, ", "))
	}
	if !slices.Contains(Activities, activity) {
		return fmt.Errorf("activity %q is not one of %s", activity, strings.Join(Activities, ", "))
	}
	return nil
}
