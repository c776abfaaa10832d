//! Storage records to wire messages.

use steward_db::{EnrollmentTokenRecord, NodeRecord, NodeState};
use steward_proto::admin::v1 as admin;
use steward_proto::agent::v1::Inventory;

use crate::sessions::SessionRegistry;

pub fn node(record: NodeRecord, sessions: &SessionRegistry) -> admin::Node {
    let inventory = serde_json::from_str::<Inventory>(&record.inventory_json).ok();
    let last_heartbeat = sessions.last_seen_unix(&record.id);
    admin::Node {
        connected: last_heartbeat.is_some(),
        models: sessions.models(&record.id),
        last_heartbeat_unix: last_heartbeat.unwrap_or(0),
        state: match record.state {
            NodeState::Ready => admin::NodeState::Ready,
            NodeState::Unavailable => admin::NodeState::Unavailable,
        } as i32,
        id: record.id,
        name: record.name,
        cordoned: record.cordoned,
        draining: record.draining,
        labels: record.labels.into_iter().collect(),
        agent_version: record.agent_version,
        inventory,
        desired_generation: record.desired_generation,
        applied_generation: record.applied_generation,
        enrolled_at_unix: record.enrolled_at,
        state_changed_at_unix: record.state_changed_at,
        certificate_not_after_unix: record.certificate_not_after,
    }
}

pub fn token(record: EnrollmentTokenRecord, now: i64) -> admin::EnrollmentToken {
    let state = if record.revoked_at.is_some() {
        admin::EnrollmentTokenState::Revoked
    } else if record.used_at.is_some() {
        admin::EnrollmentTokenState::Used
    } else if record.expires_at <= now {
        admin::EnrollmentTokenState::Expired
    } else {
        admin::EnrollmentTokenState::Active
    };
    admin::EnrollmentToken {
        id: record.id,
        description: record.description,
        state: state as i32,
        created_at_unix: record.created_at,
        expires_at_unix: record.expires_at,
        used_at_unix: record.used_at.unwrap_or(0),
        used_by_node_id: record.used_by_node_id.unwrap_or_default(),
        created_by: record.created_by,
    }
}
