//! Upstreams that page their own way (issue 16 item 4), each an in-memory upstream configured so
//! ([`Paging`]): HAPI's `_getpages` links, opaque cursors, absolute and relative `next` links,
//! `_sort` ignored, `_count` capped, no `Bundle.total`, no `_lastUpdated` search. Every export
//! must hold every resource exactly once (and, with `_since`, exactly those updated after it),
//! also when the upstream's cursors expire mid-export.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;

use serde_json::json;
use testkit::both;
use testkit::memory_fhir::{LastUpdatedSearch, MemoryFhir, Paging, PagingStyle};
use testkit::process::Store;
use testkit::setup::{Setup, assert_same, expected, ids};

/// 30 Patients with 10 Observations each, stamped 1 ms apart from 2024-01-01T00:00:00.001Z.
async fn upstream(paging: Paging) -> testkit::memory_fhir::RunningFhir {
    MemoryFhir::new()
        .synthetic(30, 10)
        .paging(paging)
        .start()
        .await
        .unwrap()
}

/// A proxy (pages of 20) in front of an upstream paging as `paging`, its next links expiring
/// `expire` times.
async fn setup(store: Store, paging: Paging, expire: u64) -> Setup {
    let s = Setup::with_upstream(store, upstream(paging).await, |config| {
        config.export.page_size = 20;
    })
    .await;
    s.fhir
        .faults
        .expire_next_links
        .store(expire, Ordering::SeqCst);
    s
}

/// Exports `query` and asserts exactly `want` came out, with no error.
async fn assert_exports(s: &Setup, query: &str, want: &BTreeMap<String, BTreeSet<String>>) {
    let (manifest, files) = s.export(query).await;
    assert_eq!(manifest["error"], json!([]), "{query}: {manifest}");
    assert_same(&ids(&files), want);
}

/// Several pages were served for a search (the paging was exercised, not one big page).
fn assert_paged(s: &Setup) {
    let pages = s.fhir.counters.pages.load(Ordering::SeqCst);
    let searches = s.fhir.counters.searches.load(Ordering::SeqCst);
    assert!(
        pages >= searches + 10,
        "{pages} pages for {searches} searches"
    );
}

both!(hapi_getpages_links_with_capped_count_and_no_total);
async fn hapi_getpages_links_with_capped_count_and_no_total(store: Store) {
    let paging = Paging {
        style: PagingStyle::GetPages,
        max_count: Some(7),
        omit_total: true,
        ..Paging::default()
    };
    let s = setup(store, paging, 0).await;
    assert_exports(&s, "/$export", &expected(&s.fhir, None)).await;
    // 330 resources, 7 a page at most: at least 48 pages.
    assert!(s.fhir.counters.pages.load(Ordering::SeqCst) >= 48);
}

both!(opaque_cursors_in_absolute_links_that_expire);
async fn opaque_cursors_in_absolute_links_that_expire(store: Store) {
    let paging = Paging {
        style: PagingStyle::Cursor,
        absolute_links: true,
        omit_total: true,
        ..Paging::default()
    };
    let s = setup(store, paging, 3).await;
    assert_exports(&s, "/$export", &expected(&s.fhir, None)).await;
    assert_paged(&s);
    assert_eq!(s.fhir.faults.expire_next_links.load(Ordering::SeqCst), 0);
}

both!(offset_links_as_absolute_urls);
async fn offset_links_as_absolute_urls(store: Store) {
    // (Offset links as a path, the default, are what every other export test follows.)
    let paging = Paging {
        style: PagingStyle::Offset,
        absolute_links: true,
        ..Paging::default()
    };
    let s = setup(store, paging, 0).await;
    assert_exports(&s, "/$export", &expected(&s.fhir, None)).await;
    assert_paged(&s);
}

both!(an_upstream_that_ignores_sort_with_expiring_cursors);
async fn an_upstream_that_ignores_sort_with_expiring_cursors(store: Store) {
    // Newest first: resuming from the greatest `lastUpdated` written would skip everything older
    // not written yet; the unit must start again instead.
    let paging = Paging {
        ignore_sort: true,
        ..Paging::default()
    };
    let s = setup(store, paging, 2).await;
    assert_exports(&s, "/$export", &expected(&s.fhir, None)).await;
    assert_eq!(s.fhir.faults.expire_next_links.load(Ordering::SeqCst), 0);
}

/// `_since` two thirds into the data: 1 ms stamps, 330 resources.
const SINCE: &str = "2024-01-01T00:00:00.220Z";

fn updated_after(s: &Setup, since: &str) -> BTreeMap<String, BTreeSet<String>> {
    ["Observation", "Patient"]
        .into_iter()
        .map(|t| {
            let ids: BTreeSet<String> = s.fhir.ids_updated_after(t, since).into_iter().collect();
            (t.to_owned(), ids)
        })
        .collect()
}

both!(no_last_updated_search_answered_with_400);
async fn no_last_updated_search_answered_with_400(store: Store) {
    // Any `_lastUpdated` (or `_sort=_lastUpdated`) would be a 400, hence an error line.
    let paging = Paging {
        style: PagingStyle::Cursor,
        last_updated: LastUpdatedSearch::Rejected,
        ..Paging::default()
    };
    let s = setup(store, paging, 2).await;
    assert_exports(&s, "/$export", &expected(&s.fhir, None)).await;
    let want = updated_after(&s, SINCE);
    assert!(want["Patient"].len() == 10 && want["Observation"].len() == 100);
    assert_exports(&s, &format!("/$export?_since={SINCE}"), &want).await;
    // Patient level: the list of Patients is searched without `_lastUpdated` too.
    assert_exports(&s, "/Patient/$export", &expected(&s.fhir, None)).await;
}

both!(no_last_updated_search_silently_ignored);
async fn no_last_updated_search_silently_ignored(store: Store) {
    // The upstream returns everything whatever the bounds: only the proxy's filter on
    // `meta.lastUpdated` makes `_since` hold.
    let paging = Paging {
        last_updated: LastUpdatedSearch::Ignored,
        ignore_sort: true,
        ..Paging::default()
    };
    let s = setup(store, paging, 1).await;
    let want = updated_after(&s, SINCE);
    assert_exports(&s, &format!("/$export?_since={SINCE}"), &want).await;
    assert_exports(&s, "/$export", &expected(&s.fhir, None)).await;
}
