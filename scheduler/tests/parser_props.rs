//! Property tests: the webhook parser and intake take arbitrary bytes without panicking, and a
//! delivery that fails writes nothing; job states never move backwards under any event order.

mod common;

use hopper_scheduler::store::{DeliveryOutcome, SqliteStore, Store};
use hopper_scheduler::webhook::{intake, payload};
use proptest::prelude::*;
use serde_json::Value;

fn event_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("workflow_job".to_string()),
        Just("ping".to_string()),
        Just("push".to_string()),
        "[a-z_]{0,16}",
    ]
}

/// Checks the all-or-nothing rule for one delivery into an empty store.
fn check_atomic(event: &str, bytes: &[u8]) -> Result<(), TestCaseError> {
    let store = SqliteStore::in_memory().unwrap();
    let result = intake(&store, "hopper", "delivery-1", event, bytes);
    let (deliveries, jobs) = store.row_counts().unwrap();
    match result {
        Err(_) => prop_assert_eq!((deliveries, jobs), (0, 0), "failed intake wrote rows"),
        Ok(DeliveryOutcome::Recorded(change)) => {
            prop_assert_eq!(deliveries, 1);
            prop_assert_eq!(jobs, u64::from(change.is_some()));
        }
        Ok(DeliveryOutcome::Duplicate) => prop_assert!(false, "fresh store saw a duplicate"),
    }
    Ok(())
}

fn real_payloads() -> Vec<Vec<u8>> {
    common::examples_of("workflow_job")
        .iter()
        .map(|e| {
            let mut e = e.clone();
            e["workflow_job"]["labels"] = serde_json::json!(["hopper-4cpu-8gb"]);
            serde_json::to_vec(&e).unwrap()
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_or_half_write(event in event_name(), bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = payload::parse(&event, &bytes);
        check_atomic(&event, &bytes)?;
    }

    #[test]
    fn mutated_real_payloads_never_panic_or_half_write(
        pick in any::<prop::sample::Index>(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let payloads = real_payloads();
        let mut bytes = pick.get(&payloads).clone();
        for (at, b) in edits {
            let i = at.index(bytes.len());
            bytes[i] = b;
        }
        if let Some(c) = cut {
            bytes.truncate(c.index(bytes.len() + 1));
        }
        check_atomic("workflow_job", &bytes)?;
    }

    #[test]
    fn arbitrary_json_values_in_the_fields(id in any::<i64>(), labels in proptest::collection::vec(".{0,20}", 0..5), action in "[a-z_]{0,12}", run_attempt in any::<i64>()) {
        let mut e = common::examples_of("workflow_job")[0].clone();
        e["action"] = Value::from(action);
        e["workflow_job"]["id"] = Value::from(id);
        e["workflow_job"]["run_attempt"] = Value::from(run_attempt);
        e["workflow_job"]["labels"] = labels.iter().map(|l| Value::from(format!("hopper-{l}"))).collect();
        check_atomic("workflow_job", &serde_json::to_vec(&e).unwrap())?;
    }

    #[test]
    fn job_state_never_moves_backwards(actions in proptest::collection::vec(0usize..4, 1..12)) {
        const ACTIONS: [&str; 4] = ["queued", "in_progress", "completed", "waiting"];
        const ORDER: [&str; 3] = ["queued", "running", "completed"];
        let store = SqliteStore::in_memory().unwrap();
        let mut last = None;
        for (n, a) in actions.iter().enumerate() {
            let body = serde_json::to_vec(&common::workflow_job(ACTIONS[*a], 1, &["hopper"])).unwrap();
            intake(&store, "hopper", &format!("d{n}"), "workflow_job", &body).unwrap();
            if let Some(job) = store.job(1).unwrap() {
                let rank = ORDER.iter().position(|s| *s == job.state.as_str()).unwrap();
                prop_assert!(last.is_none_or(|l| rank >= l), "moved back to {}", job.state.as_str());
                last = Some(rank);
            }
        }
        // The furthest event seen decides the state.
        let furthest = actions.iter().filter(|a| **a < 3).max();
        let job = store.job(1).unwrap();
        prop_assert_eq!(job.map(|j| j.state.as_str()), furthest.map(|a| ORDER[*a]));
    }
}
