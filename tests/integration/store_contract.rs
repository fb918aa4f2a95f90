//! The `JobStore` contract: one set of checks, each generic over the store, run against the
//! embedded store (in a temporary directory) and against Redis (a private `redis-server` per
//! test). Times are logical (`NOW` and offsets from it), so leases and expiries are tested
//! without sleeping.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use fhir_bulk_proxy::job::{Checkpoint, Job, JobState, OutputFile, Unit, UnitState, UnixSecs};
use fhir_bulk_proxy::store::embedded::EmbeddedStore;
use fhir_bulk_proxy::store::redis::RedisStore;
use fhir_bulk_proxy::store::{Created, JobStore, StoreError};

use testkit::{RedisServer, eventually};

const NOW: u64 = 1_700_000_000;

/// A Running job. Built from JSON with only the fields that have no default, so that fields added
/// later (which must have defaults: see `job`) do not break the suite.
fn job(id: &str, client: &str, units: u32) -> Job {
    serde_json::from_value(serde_json::json!({
        "id": id,
        "client_id": client,
        "level": { "level": "system" },
        "request": "http://proxy/fhir/$export",
        "transaction_time": "2024-01-01T00:00:00Z",
        "types": ["Patient", "Observation"],
        "state": "running",
        "created_at": NOW,
        "units_total": units,
    }))
    .unwrap()
}

fn units(job_id: &str, n: u32) -> Vec<Unit> {
    (0..n)
        .map(|i| {
            Unit::new(
                job_id,
                i,
                "Observation",
                format!("Observation?patient=p{i}"),
            )
        })
        .collect()
}

/// Stores a Running job with `n` Pending units.
async fn create(store: &Arc<dyn JobStore>, id: &str, n: u32) -> Job {
    let job = job(id, "client", n);
    assert_eq!(
        store
            .create_job(&job, &units(id, n), &[], 100)
            .await
            .unwrap(),
        Created::Yes
    );
    job
}

async fn create_round_trip_and_delete(store: Arc<dyn JobStore>) {
    let mut job = create(&store, "j1", 3).await;
    assert_eq!(store.get_job("j1").await.unwrap(), Some(job.clone()));
    assert_eq!(store.get_job("nope").await.unwrap(), None);
    assert_eq!(store.job_ids().await.unwrap(), vec!["j1".to_owned()]);
    assert_eq!(store.units("j1").await.unwrap(), units("j1", 3));

    job.resources_written = 42;
    job.units_done = 1;
    job.warnings.push("ignored _foo".to_owned());
    assert!(store.put_job(&job).await.unwrap());
    assert_eq!(store.get_job("j1").await.unwrap(), Some(job.clone()));

    assert!(store.delete_job("j1").await.unwrap());
    assert!(
        !store.delete_job("j1").await.unwrap(),
        "a second delete finds nothing"
    );
    assert_eq!(store.get_job("j1").await.unwrap(), None);
    assert!(store.units("j1").await.unwrap().is_empty());
    assert!(store.job_ids().await.unwrap().is_empty());
    assert!(
        !store.put_job(&job).await.unwrap(),
        "put_job must not resurrect a deleted job"
    );
    assert_eq!(store.get_job("j1").await.unwrap(), None);
    store.ping().await.unwrap();
}

/// Creates job `id` of `client` with `n` units, under the per-client `cap`.
async fn create_capped(
    store: &Arc<dyn JobStore>,
    id: &str,
    client: &str,
    n: u32,
    cap: usize,
) -> Created {
    store
        .create_job(&job(id, client, n), &units(id, n), &[], cap)
        .await
        .unwrap()
}

/// `worker`'s claim on a unit at `now`, leased until `until`.
async fn lease(
    store: &Arc<dyn JobStore>,
    worker: &str,
    now: UnixSecs,
    until: UnixSecs,
) -> Option<Unit> {
    store.claim_unit(worker, now, until).await.unwrap()
}

/// `finisher`'s claim on finalising `job_id` at `now`, held until `until`: the attempt number.
async fn claim(
    store: &Arc<dyn JobStore>,
    job_id: &str,
    finisher: &str,
    now: UnixSecs,
    until: UnixSecs,
) -> Option<u32> {
    store
        .claim_finalize(job_id, finisher, now, until)
        .await
        .unwrap()
}

async fn units_are_ordered_by_index(store: Arc<dyn JobStore>) {
    // More than ten, handed over out of order: catches keys that sort as text ("10" < "2").
    let mut shuffled = units("j1", 25);
    shuffled.reverse();
    shuffled.swap(3, 17);
    store
        .create_job(&job("j1", "c", 25), &shuffled, &[], 1)
        .await
        .unwrap();
    let indexes: Vec<u32> = store
        .units("j1")
        .await
        .unwrap()
        .iter()
        .map(|u| u.index)
        .collect();
    assert_eq!(indexes, (0..25).collect::<Vec<_>>());
}

async fn per_client_cap(store: Arc<dyn JobStore>) {
    let cap = 2;
    assert_eq!(create_capped(&store, "a1", "a", 1, cap).await, Created::Yes);
    assert_eq!(create_capped(&store, "a2", "a", 1, cap).await, Created::Yes);
    assert_eq!(
        create_capped(&store, "a3", "a", 1, cap).await,
        Created::TooManyActive
    );
    assert_eq!(
        store.get_job("a3").await.unwrap(),
        None,
        "a refused job is not stored"
    );
    assert!(store.units("a3").await.unwrap().is_empty());
    assert_eq!(
        create_capped(&store, "b1", "b", 1, cap).await,
        Created::Yes,
        "the cap is per client"
    );

    // A completed job no longer counts...
    let mut a1 = store.get_job("a1").await.unwrap().unwrap();
    a1.state = JobState::Completed;
    assert!(store.put_job(&a1).await.unwrap());
    assert_eq!(create_capped(&store, "a3", "a", 1, cap).await, Created::Yes);
    // ...nor does a deleted one.
    assert!(store.delete_job("a2").await.unwrap());
    assert_eq!(create_capped(&store, "a4", "a", 1, cap).await, Created::Yes);
    assert_eq!(
        create_capped(&store, "a5", "a", 1, cap).await,
        Created::TooManyActive
    );
}

async fn concurrent_kickoffs_respect_the_cap(store: Arc<dyn JobStore>) {
    let cap = 3;
    let tasks: Vec<_> = (0..24)
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let id = format!("k{i}");
                store
                    .create_job(&job(&id, "racer", 2), &units(&id, 2), &[], cap)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut created = 0;
    for task in tasks {
        if task.await.unwrap() == Created::Yes {
            created += 1;
        }
    }
    assert_eq!(created, cap);
    assert_eq!(store.job_ids().await.unwrap().len(), cap);
}

async fn claims_are_exclusive(store: Arc<dyn JobStore>) {
    create(&store, "j1", 40).await;
    create(&store, "j2", 40).await;
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let worker = format!("w{w}");
                let mut claimed = Vec::new();
                while let Some(unit) = lease(&store, &worker, NOW, NOW + 60).await {
                    assert_eq!(unit.owner.as_deref(), Some(worker.as_str()));
                    assert_eq!(unit.state, UnitState::Running);
                    assert_eq!(unit.lease_until, NOW + 60);
                    claimed.push((unit.job_id, unit.index));
                }
                claimed
            })
        })
        .collect();
    let mut seen = HashSet::new();
    for worker in workers {
        for claim in worker.await.unwrap() {
            assert!(seen.insert(claim.clone()), "{claim:?} was claimed twice");
        }
    }
    assert_eq!(seen.len(), 80, "every unit is claimed once");
    // Every lease is live: nothing more to claim.
    assert_eq!(lease(&store, "late", NOW + 59, NOW + 120).await, None);
}

async fn expired_leases_are_taken_over(store: Arc<dyn JobStore>) {
    create(&store, "j1", 1).await;
    let mut unit = lease(&store, "w1", NOW, NOW + 10).await.unwrap();
    assert_eq!(lease(&store, "w2", NOW + 5, NOW + 15).await, None);

    // A save extends the lease and keeps the checkpoint.
    unit.lease_until = NOW + 30;
    unit.checkpoint = Checkpoint {
        next: Some("https://upstream/fhir?page=2".to_owned()),
        pages: 1,
        files: vec![OutputFile {
            resource_type: "Observation".to_owned(),
            name: "Observation.0.ndjson".to_owned(),
            count: 100,
            bytes: 12_345,
            upload: None,
        }],
        last_updated: Some("2024-01-01T00:00:00Z".to_owned()),
        ids_at_last_updated: vec!["o1".to_owned()],
        issues: Vec::new(),
        references: ["Organization/a".to_owned(), "Practitioner/b".to_owned()].into(),
    };
    assert!(store.save_unit(&unit, "w1").await.unwrap());
    assert_eq!(lease(&store, "w2", NOW + 20, NOW + 40).await, None);

    // The worker dies; after its lease, another takes the unit over, checkpoint included.
    let taken = lease(&store, "w2", NOW + 31, NOW + 90).await.unwrap();
    assert_eq!((taken.job_id.as_str(), taken.index), ("j1", 0));
    assert_eq!(taken.owner.as_deref(), Some("w2"));
    assert_eq!(taken.checkpoint, unit.checkpoint);

    // The old owner comes back: its writes are refused.
    assert!(!store.save_unit(&unit, "w1").await.unwrap());
    let mut done = unit.clone();
    done.state = UnitState::Done;
    assert_eq!(store.finish_unit(&done, "w1").await.unwrap(), None);
    store.release_unit(&unit, "w1").await.unwrap();
    let stored = store.units("j1").await.unwrap().remove(0);
    assert_eq!(stored.owner.as_deref(), Some("w2"));
    assert_eq!(stored.state, UnitState::Running);
    assert_eq!(stored.lease_until, NOW + 90);
    assert!(store.save_unit(&taken, "w2").await.unwrap());
}

async fn released_units_are_claimable_at_once(store: Arc<dyn JobStore>) {
    create(&store, "j1", 1).await;
    let unit = lease(&store, "w1", NOW, NOW + 600).await.unwrap();
    store.release_unit(&unit, "someone-else").await.unwrap();
    assert_eq!(
        lease(&store, "w2", NOW, NOW + 600).await,
        None,
        "only the owner releases"
    );

    store.release_unit(&unit, "w1").await.unwrap();
    let stored = store.units("j1").await.unwrap().remove(0);
    assert_eq!(stored.state, UnitState::Pending);
    assert_eq!(stored.owner, None);
    let again = lease(&store, "w2", NOW, NOW + 600).await.unwrap();
    assert_eq!(again.owner.as_deref(), Some("w2"));
    assert!(
        !store.save_unit(&unit, "w1").await.unwrap(),
        "a released lease is gone"
    );
}

async fn only_units_of_running_jobs_are_claimable(store: Arc<dyn JobStore>) {
    let mut finished = job("done", "c", 2);
    finished.state = JobState::Completed;
    store
        .create_job(&finished, &units("done", 2), &[], 1)
        .await
        .unwrap();
    assert_eq!(lease(&store, "w", NOW, NOW + 60).await, None);

    let mut running = create(&store, "j1", 2).await;
    running.state = JobState::Failed;
    running.error = Some("upstream gone".to_owned());
    assert!(store.put_job(&running).await.unwrap());
    assert_eq!(lease(&store, "w", NOW, NOW + 60).await, None);

    running.state = JobState::Running;
    assert!(store.put_job(&running).await.unwrap());
    assert!(lease(&store, "w", NOW, NOW + 60).await.is_some());
}

async fn finishing_counts_down(store: Arc<dyn JobStore>) {
    create(&store, "j1", 3).await;
    let mut claimed = Vec::new();
    while let Some(unit) = lease(&store, "w", NOW, NOW + 60).await {
        claimed.push(unit);
    }
    assert_eq!(claimed.len(), 3);
    let mut left = Vec::new();
    for (i, mut unit) in claimed.into_iter().enumerate() {
        unit.state = if i == 1 {
            UnitState::Failed
        } else {
            UnitState::Done
        };
        unit.error = (i == 1).then(|| "410 Gone".to_owned());
        left.push(store.finish_unit(&unit, "w").await.unwrap());
        // A finished unit has no lease left to save under...
        assert!(!store.save_unit(&unit, "w").await.unwrap());
        // ...and a retried finish (its first answer lost) is idempotent.
        assert_eq!(store.finish_unit(&unit, "w").await.unwrap(), left[i]);
    }
    assert_eq!(left, vec![Some(2), Some(1), Some(0)]);
    let states: Vec<_> = store
        .units("j1")
        .await
        .unwrap()
        .iter()
        .map(|u| u.state)
        .collect();
    assert_eq!(
        states,
        vec![UnitState::Done, UnitState::Failed, UnitState::Done]
    );
    assert_eq!(
        store.units("j1").await.unwrap()[1].error.as_deref(),
        Some("410 Gone")
    );
    // Finished units are never claimed again, even long after their leases.
    assert_eq!(lease(&store, "w2", NOW + 10_000, NOW + 10_060).await, None);
}

async fn exactly_one_concurrent_finisher_sees_zero(store: Arc<dyn JobStore>) {
    let n = 16;
    create(&store, "j1", n).await;
    let mut claimed = Vec::new();
    for w in 0..n {
        let worker = format!("w{w}");
        let unit = lease(&store, &worker, NOW, NOW + 60).await.unwrap();
        claimed.push((worker, unit));
    }
    let finishers: Vec<_> = claimed
        .into_iter()
        .map(|(worker, mut unit)| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                unit.state = UnitState::Done;
                store.finish_unit(&unit, &worker).await.unwrap().unwrap()
            })
        })
        .collect();
    let mut left = Vec::new();
    for finisher in finishers {
        left.push(finisher.await.unwrap());
    }
    left.sort_unstable();
    assert_eq!(
        left,
        (0..n).collect::<Vec<_>>(),
        "each count is seen once, 0 by exactly one"
    );
}

async fn deleted_jobs_refuse_unit_writes(store: Arc<dyn JobStore>) {
    create(&store, "j1", 2).await;
    let mut unit = lease(&store, "w", NOW, NOW + 60).await.unwrap();
    assert!(store.delete_job("j1").await.unwrap());
    assert!(!store.save_unit(&unit, "w").await.unwrap());
    unit.state = UnitState::Done;
    assert_eq!(store.finish_unit(&unit, "w").await.unwrap(), None);
    store.release_unit(&unit, "w").await.unwrap();
    assert_eq!(lease(&store, "w", NOW + 1_000, NOW + 1_060).await, None);
    assert!(store.units("j1").await.unwrap().is_empty());
}

/// Finishes every unit of `job_id` (claimed by worker "w").
async fn finish_all(store: &Arc<dyn JobStore>, job_id: &str) {
    while let Some(mut unit) = lease(store, "w", NOW, NOW + 60).await {
        assert_eq!(unit.job_id, job_id);
        unit.state = UnitState::Done;
        store.finish_unit(&unit, "w").await.unwrap().unwrap();
    }
}

async fn finalisation_is_claimed_by_one_finisher(store: Arc<dyn JobStore>) {
    create(&store, "j1", 2).await;
    assert_eq!(
        claim(&store, "nope", "f0", NOW, NOW + 60).await,
        None,
        "no such job"
    );
    assert_eq!(
        claim(&store, "j1", "f0", NOW, NOW + 60).await,
        None,
        "units are unfinished"
    );
    finish_all(&store, "j1").await;

    // Many finishers at once (the last worker, every replica's sweeper): one gets it.
    let racers: Vec<_> = (0..8)
        .map(|f| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let finisher = format!("f{f}");
                let claim = claim(&store, "j1", &finisher, NOW, NOW + 60).await;
                claim.map(|attempt| (finisher, attempt))
            })
        })
        .collect();
    let mut winners = Vec::new();
    for racer in racers {
        winners.extend(racer.await.unwrap());
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
    let (holder, attempt) = winners.remove(0);
    assert_eq!(attempt, 1);
    let other = if holder == "f0" { "f1" } else { "f0" };

    // The claim is the holder's while its lease lasts; the holder itself may claim again (a
    // retry), which counts as the next attempt.
    assert_eq!(claim(&store, "j1", other, NOW + 60, NOW + 120).await, None);
    assert_eq!(
        claim(&store, "j1", &holder, NOW + 10, NOW + 70).await,
        Some(2)
    );
    assert!(!store.extend_finalize("j1", other, NOW + 500).await.unwrap());
    assert!(
        store
            .extend_finalize("j1", &holder, NOW + 100)
            .await
            .unwrap()
    );
    assert_eq!(
        claim(&store, "j1", other, NOW + 100, NOW + 160).await,
        None,
        "the extended lease holds"
    );

    // The holder dies: after its lease another finisher takes over, and only it may commit.
    assert_eq!(
        claim(&store, "j1", other, NOW + 101, NOW + 160).await,
        Some(3)
    );
    let mut done = store.get_job("j1").await.unwrap().unwrap();
    done.state = JobState::Completed;
    done.resources_written = 7;
    assert!(!store.complete_job(&done, &holder).await.unwrap());
    assert_eq!(
        store.get_job("j1").await.unwrap().unwrap().state,
        JobState::Running,
        "a finisher that lost its claim commits nothing"
    );
    assert!(store.complete_job(&done, other).await.unwrap());
    assert_eq!(store.get_job("j1").await.unwrap(), Some(done.clone()));

    // Committed once: no more claims, extensions or commits.
    assert!(!store.complete_job(&done, other).await.unwrap());
    assert!(!store.extend_finalize("j1", other, NOW + 500).await.unwrap());
    assert_eq!(
        claim(&store, "j1", other, NOW + 1_000, NOW + 1_060).await,
        None
    );
}

async fn a_finalised_job_frees_its_clients_slot(store: Arc<dyn JobStore>) {
    let cap = 1;
    create_capped(&store, "a1", "a", 1, cap).await;
    assert_eq!(
        create_capped(&store, "a2", "a", 0, cap).await,
        Created::TooManyActive
    );
    finish_all(&store, "a1").await;
    assert_eq!(claim(&store, "a1", "f", NOW, NOW + 60).await, Some(1));
    let mut failed = store.get_job("a1").await.unwrap().unwrap();
    failed.state = JobState::Failed;
    failed.error = Some("the export files could not be assembled".to_owned());
    assert!(store.complete_job(&failed, "f").await.unwrap());
    assert_eq!(store.get_job("a1").await.unwrap(), Some(failed));

    // A job with no units at all is ready to finalise from the start.
    assert_eq!(create_capped(&store, "a2", "a", 0, cap).await, Created::Yes);
    assert_eq!(claim(&store, "a2", "f", NOW, NOW + 60).await, Some(1));
}

async fn a_deleted_job_cannot_be_finalised(store: Arc<dyn JobStore>) {
    create(&store, "j1", 1).await;
    finish_all(&store, "j1").await;
    assert_eq!(claim(&store, "j1", "f", NOW, NOW + 60).await, Some(1));
    let mut done = store.get_job("j1").await.unwrap().unwrap();
    assert!(store.delete_job("j1").await.unwrap());
    done.state = JobState::Completed;
    assert!(!store.complete_job(&done, "f").await.unwrap());
    assert!(!store.extend_finalize("j1", "f", NOW + 60).await.unwrap());
    assert_eq!(store.get_job("j1").await.unwrap(), None);

    // A job created again under the id starts with a fresh claim and attempt count.
    create(&store, "j1", 0).await;
    assert_eq!(claim(&store, "j1", "g", NOW, NOW + 60).await, Some(1));
}

async fn first_poll_marks_go_with_their_job(store: Arc<dyn JobStore>) {
    assert!(
        !store.first_poll("j1").await.unwrap(),
        "no mark for a job that does not exist"
    );
    create(&store, "j1", 1).await;
    assert!(store.first_poll("j1").await.unwrap());
    assert!(!store.first_poll("j1").await.unwrap());
    assert!(store.delete_job("j1").await.unwrap());
    assert!(!store.first_poll("j1").await.unwrap());
    create(&store, "j1", 1).await;
    assert!(
        store.first_poll("j1").await.unwrap(),
        "the deleted job's mark is gone"
    );
}

async fn status_polls_are_rate_limited(store: Arc<dyn JobStore>) {
    let t = 1_700_000_000_000;
    assert!(store.record_poll("j1", t, 500).await.unwrap());
    assert!(!store.record_poll("j1", t + 200, 500).await.unwrap());
    assert!(
        !store.record_poll("j1", t + 499, 500).await.unwrap(),
        "refused polls do not count"
    );
    assert!(store.record_poll("j1", t + 500, 500).await.unwrap());
    assert!(!store.record_poll("j1", t + 600, 500).await.unwrap());
    assert!(
        store.record_poll("j2", t + 600, 500).await.unwrap(),
        "per job"
    );
}

async fn jtis_are_single_use_until_they_expire(store: Arc<dyn JobStore>) {
    assert!(
        store
            .first_use("iss", "jti-1", NOW, NOW + 60)
            .await
            .unwrap()
    );
    assert!(
        !store
            .first_use("iss", "jti-1", NOW + 1, NOW + 60)
            .await
            .unwrap(),
        "replay"
    );
    assert!(
        store
            .first_use("other", "jti-1", NOW + 1, NOW + 60)
            .await
            .unwrap(),
        "per issuer"
    );
    assert!(
        store
            .first_use("iss", "jti-2", NOW + 1, NOW + 60)
            .await
            .unwrap()
    );
    // Separators in names cannot make two pairs collide.
    assert!(store.first_use("a:b", "c", NOW, NOW + 60).await.unwrap());
    assert!(store.first_use("a", "b:c", NOW, NOW + 60).await.unwrap());

    // Forgotten once expired; then remembered again with the new expiry.
    assert!(
        store
            .first_use("iss", "jti-1", NOW + 60, NOW + 120)
            .await
            .unwrap()
    );
    assert!(
        !store
            .first_use("iss", "jti-1", NOW + 61, NOW + 120)
            .await
            .unwrap()
    );
}

async fn members_are_stored_with_their_job_and_go_with_it(store: Arc<dyn JobStore>) {
    let members: Vec<String> = (0..500).map(|i| format!("patient-{i}")).collect();
    let first = job("j1", "client", 2);
    assert_eq!(
        store
            .create_job(&first, &units("j1", 2), &members, 100)
            .await
            .unwrap(),
        Created::Yes
    );
    assert_eq!(store.members("j1").await.unwrap(), members);
    // Not in the records read on every poll and checkpoint.
    assert!(
        !serde_json::to_string(&store.get_job("j1").await.unwrap())
            .unwrap()
            .contains("patient-499")
    );
    create(&store, "j2", 1).await;
    assert!(
        store.members("j2").await.unwrap().is_empty(),
        "stored without"
    );
    // A refused job stores nothing.
    let over = job("j3", "client", 1);
    assert_eq!(
        store
            .create_job(&over, &units("j3", 1), &members, 2)
            .await
            .unwrap(),
        Created::TooManyActive
    );
    assert!(store.members("j3").await.unwrap().is_empty());
    assert!(store.delete_job("j1").await.unwrap());
    assert!(store.members("j1").await.unwrap().is_empty());
}

/// One `#[tokio::test]` per check and store: `store_contract::embedded::NAME`,
/// `store_contract::redis::NAME`.
macro_rules! contract {
    ($($check:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $check() {
                    let dir = tempfile::TempDir::new().unwrap();
                    super::$check(super::embedded(&dir)).await;
                }
            )*
        }

        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $check() {
                    let server = testkit::RedisServer::start();
                    super::$check(super::redis(&server).await).await;
                }
            )*
        }
    };
}

contract!(
    create_round_trip_and_delete,
    units_are_ordered_by_index,
    per_client_cap,
    concurrent_kickoffs_respect_the_cap,
    claims_are_exclusive,
    expired_leases_are_taken_over,
    released_units_are_claimable_at_once,
    only_units_of_running_jobs_are_claimable,
    finishing_counts_down,
    exactly_one_concurrent_finisher_sees_zero,
    deleted_jobs_refuse_unit_writes,
    finalisation_is_claimed_by_one_finisher,
    a_finalised_job_frees_its_clients_slot,
    a_deleted_job_cannot_be_finalised,
    first_poll_marks_go_with_their_job,
    status_polls_are_rate_limited,
    jtis_are_single_use_until_they_expire,
    members_are_stored_with_their_job_and_go_with_it,
);

fn embedded(dir: &tempfile::TempDir) -> Arc<dyn JobStore> {
    Arc::new(EmbeddedStore::open(&dir.path().join("jobs.redb")).unwrap())
}

async fn redis(server: &RedisServer) -> Arc<dyn JobStore> {
    Arc::new(RedisStore::connect(&server.url()).await.unwrap())
}

#[tokio::test]
async fn embedded_store_survives_a_reopen() {
    let dir = tempfile::TempDir::new().unwrap();
    let path = dir.path().join("jobs.redb");
    let store = embedded(&dir);
    let job = create(&store, "j1", 3).await;
    let mut unit = lease(&store, "w", NOW, NOW + 60).await.unwrap();
    unit.checkpoint.pages = 7;
    assert!(store.save_unit(&unit, "w").await.unwrap());
    assert!(store.first_use("iss", "jti", NOW, NOW + 60).await.unwrap());
    drop(store);

    let store: Arc<dyn JobStore> = Arc::new(EmbeddedStore::open(&path).unwrap());
    assert_eq!(store.get_job("j1").await.unwrap(), Some(job));
    let units = store.units("j1").await.unwrap();
    assert_eq!(units.len(), 3);
    assert_eq!(units[0].checkpoint.pages, 7);
    assert_eq!(units[0].owner.as_deref(), Some("w"));
    // Leases and the claimable index survive too.
    assert!(store.save_unit(&units[0], "w").await.unwrap());
    let next = lease(&store, "w2", NOW, NOW + 60).await.unwrap();
    assert_eq!(next.index, 1);
    assert!(
        !store
            .first_use("iss", "jti", NOW + 1, NOW + 60)
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn redis_restarted_empty_forgets_jobs_without_failing() {
    let mut server = RedisServer::start();
    let store = redis(&server).await;
    create(&store, "j1", 2).await;
    server.restart();

    // The first call may meet the dead connection; within a few seconds the manager reconnects.
    let job = eventually(
        "Redis to be reconnected",
        Duration::from_secs(10),
        || async {
            match store.get_job("j1").await {
                Err(StoreError::Unavailable(e)) => Err(e),
                other => Ok(other),
            }
        },
    )
    .await;
    assert_eq!(job.expect("no recovery after a restart"), None);
    assert_eq!(lease(&store, "w", NOW, NOW + 60).await, None);
    // Scripts are loaded again after the restart emptied the script cache.
    create(&store, "j2", 1).await;
    assert!(lease(&store, "w", NOW, NOW + 60).await.is_some());
}

#[tokio::test]
async fn redis_down_answers_unavailable_quickly() {
    let mut server = RedisServer::start();
    let store = redis(&server).await;
    create(&store, "j1", 1).await;
    server.stop();

    for _ in 0..3 {
        let started = std::time::Instant::now();
        let outcome = tokio::time::timeout(Duration::from_secs(10), store.get_job("j1"))
            .await
            .expect("a store whose Redis is down must not hang");
        assert!(
            matches!(outcome, Err(StoreError::Unavailable(_))),
            "{outcome:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "took {:?}",
            started.elapsed()
        );
    }
    let claim = store.claim_unit("w", NOW, NOW + 60).await;
    assert!(
        matches!(claim, Err(StoreError::Unavailable(_))),
        "{claim:?}"
    );

    let refused = RedisStore::connect(&server.url()).await;
    assert!(
        matches!(refused, Err(StoreError::Unavailable(_))),
        "{refused:?}"
    );
}

#[tokio::test]
async fn redis_delete_leaves_no_keys_behind() {
    let server = RedisServer::start();
    let store = redis(&server).await;
    create(&store, "j1", 5).await;
    let mut unit = lease(&store, "w", NOW, NOW + 60).await.unwrap();
    unit.state = UnitState::Done;
    store.finish_unit(&unit, "w").await.unwrap();
    lease(&store, "w", NOW, NOW + 60).await.unwrap();
    assert!(store.record_poll("j1", 1_000, 60_000).await.unwrap());
    assert!(store.first_poll("j1").await.unwrap());
    let members = ["p1".to_owned(), "p2".to_owned()];
    let with_members = job("j2", "client", 0);
    store
        .create_job(&with_members, &[], &members, 100)
        .await
        .unwrap();
    assert_eq!(claim(&store, "j2", "f", NOW, NOW + 60).await, Some(1));
    assert!(store.first_poll("j2").await.unwrap());
    assert!(store.delete_job("j1").await.unwrap());
    assert!(store.delete_job("j2").await.unwrap());

    let client = ::redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = ::redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(keys.is_empty(), "left behind: {keys:?}");
}
