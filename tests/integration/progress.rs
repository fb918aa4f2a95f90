//! Searches counted at kick-off (`_summary=count`): worked on largest first, and progress told in
//! percent of the counted resources (issue 16 item 6, issue 17).

use std::sync::atomic::Ordering;

use testkit::both;
use testkit::process::Store;
use testkit::setup::Setup;

const TYPES: [&str; 3] = ["Patient", "Condition", "Observation"];

both!(searches_are_counted_and_run_largest_first);
async fn searches_are_counted_and_run_largest_first(store: Store) {
    // One worker: the searches run one after the other, in the order they are claimed.
    let s = Setup::new(store, |c| c.export.workers = 1).await;
    let before = s.fhir.counters.served.lock().unwrap().len();
    let counts_before = s.fhir.counters.counts.load(Ordering::SeqCst);
    s.export(&format!("/$export?_type={}", TYPES.join(",")))
        .await;
    let served = s.fhir.counters.served.lock().unwrap()[before..].to_vec();
    let mut order: Vec<String> = Vec::new();
    for (t, offset) in &served {
        if *offset == 0 && !order.contains(t) {
            order.push(t.clone());
        }
    }
    let mut by_size: Vec<(usize, &str)> = TYPES.iter().map(|t| (s.fhir.ids(t).len(), *t)).collect();
    by_size.sort_by(|a, b| b.cmp(a));
    let want: Vec<&str> = by_size.iter().map(|(_, t)| *t).collect();
    assert_eq!(order, want, "served: {served:?}");
    assert_eq!(
        s.fhir.counters.counts.load(Ordering::SeqCst) - counts_before,
        TYPES.len() as u64,
        "one count per search"
    );
}

both!(progress_is_told_in_percent_of_the_counted_resources);
async fn progress_is_told_in_percent_of_the_counted_resources(store: Store) {
    let s = Setup::new(store, |c| c.export.page_size = 50).await;
    let expected: usize = TYPES.iter().map(|t| s.fhir.ids(t).len()).sum();
    // Slow pages, so that the job is still running when polled.
    s.fhir.faults.latency_ms.store(150, Ordering::SeqCst);
    let status_url = s
        .start(&format!("/$export?_type={}", TYPES.join(",")))
        .await;
    let first = s.get(&status_url).await;
    assert_eq!(first.status(), 202);
    let progress = first.headers()["x-progress"].to_str().unwrap().to_owned();
    let (percent, rest) = progress.split_once("% (").expect(&progress);
    let percent: u64 = percent.parse().expect(&progress);
    assert!(percent < 100, "{progress}");
    assert!(
        rest.contains(&format!(" of {expected} resources), "))
            && rest.ends_with(" of 3 searches done"),
        "{progress}"
    );
    s.fhir.faults.latency_ms.store(0, Ordering::SeqCst);
    // As a client honouring the first poll's Retry-After.
    tokio::time::sleep(std::time::Duration::from_secs(testkit::retry_after(&first))).await;
    let manifest = s.manifest(&status_url).await;
    let written: u64 = manifest["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["count"].as_u64().unwrap())
        .sum();
    assert_eq!(written, expected as u64);
}
