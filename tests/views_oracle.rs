//! The view invariant, as a property: for random topic contents and random sequences of puts,
//! deletes and snapshots, after every writer step each view equals a from-scratch recompute by
//! an independent, naive implementation of the view semantics (the oracle). The views cover
//! includes chained through earlier includes, filters, selects, group_by moves, a view of a
//! view, a view including a grouped view, and values that are not JSON (a row whose input is
//! not JSON keeps its last good value: the oracle remembers the last step's rows for that).

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use proptest::prelude::*;
use serde_json::{json, Map, Value};
use viewcar::views::ViewSpec;
use viewcar::{Changes, Standalone};

#[path = "common/oracle.rs"]
mod oracle;
use oracle::{key_text, lookup, path, Topic};

type Model = HashMap<&'static str, Topic>;

const TOPICS: [&str; 4] = ["products", "prices", "brands", "countries"];

fn specs() -> Vec<ViewSpec> {
    vec![
        // Declared before the view it reads: the engine orders by dependency.
        ViewSpec::new("by_country", "page")
            .group_by("country.name")
            .select(["id", "brand.name as brand"]),
        ViewSpec::new("page", "products")
            .filter("status == 'active'")
            .include("price", "prices", "id")
            .include("brand", "brands", "brand_id")
            .include("country", "countries", "brand.country_id"),
        ViewSpec::new("by_cat", "products")
            .include("price", "prices", "id")
            .group_by("category")
            .select(["id", "price.amount as amount"]),
        ViewSpec::new("peers", "products")
            .include("peers", "by_cat", "category")
            .select(["id", "peers"]),
    ]
}

// ----- the oracle -----

fn object(b: &Bytes) -> Option<Map<String, Value>> {
    match serde_json::from_slice(b).ok()? {
        Value::Object(m) => Some(m),
        _ => None,
    }
}

fn select(row: &Map<String, Value>, fields: &[(&str, &str)]) -> Value {
    let mut out = Map::new();
    for (p, name) in fields {
        if let Some(v) = path(row, p) {
            out.insert(name.to_string(), v.clone());
        }
    }
    Value::Object(out)
}

fn group(members: Vec<(String, Option<String>, Value)>) -> BTreeMap<String, Value> {
    let mut groups: BTreeMap<String, BTreeMap<String, Value>> = BTreeMap::new();
    for (key, g, v) in members {
        if let Some(g) = g {
            groups.entry(g).or_default().insert(key, v);
        }
    }
    groups
        .into_iter()
        .map(|(g, m)| (g, Value::Array(m.into_values().collect())))
        .collect()
}

fn not_json(b: &Bytes) -> bool {
    serde_json::from_slice::<Value>(b).is_err()
}

/// What the last step's views held: a row whose input is not JSON keeps its last good value
/// (and a grouped row its group), so the expected views depend on them.
#[derive(Default)]
struct Last {
    page: BTreeMap<String, Map<String, Value>>,
    by_cat: BTreeMap<String, (String, Value)>,
    peers: BTreeMap<String, Value>,
}

fn expected(m: &Model, last: &mut Last) -> HashMap<&'static str, BTreeMap<String, Value>> {
    let mut page = BTreeMap::new();
    let mut by_cat_members = Vec::new();
    let mut by_cat_last = BTreeMap::new();
    for (k, b) in &m["products"] {
        if not_json(b) {
            if let Some(row) = last.page.get(k) {
                page.insert(k.clone(), row.clone());
            }
            if let Some((g, v)) = last.by_cat.get(k) {
                by_cat_members.push((k.clone(), Some(g.clone()), v.clone()));
                by_cat_last.insert(k.clone(), (g.clone(), v.clone()));
            }
            continue;
        }
        let Some(p) = object(b) else { continue };
        // page
        let mut row = p.clone();
        let ok = (|| {
            let price = lookup(&m["prices"], path(&row, "id").and_then(key_text))?;
            row.insert("price".into(), price);
            let brand = lookup(&m["brands"], path(&row, "brand_id").and_then(key_text))?;
            row.insert("brand".into(), brand);
            let country = lookup(
                &m["countries"],
                path(&row, "brand.country_id").and_then(key_text),
            )?;
            row.insert("country".into(), country);
            Some(())
        })();
        if ok.is_none() {
            if let Some(row) = last.page.get(k) {
                page.insert(k.clone(), row.clone());
            }
        } else if path(&row, "status") == Some(&json!("active")) {
            page.insert(k.clone(), row);
        }
        // by_cat
        let mut row = p;
        if let Some(price) = lookup(&m["prices"], path(&row, "id").and_then(key_text)) {
            row.insert("price".into(), price);
            let g = path(&row, "category").and_then(key_text);
            let member = select(&row, &[("id", "id"), ("price.amount", "amount")]);
            if let Some(g) = &g {
                by_cat_last.insert(k.clone(), (g.clone(), member.clone()));
            }
            by_cat_members.push((k.clone(), g, member));
        } else if let Some((g, v)) = last.by_cat.get(k) {
            by_cat_members.push((k.clone(), Some(g.clone()), v.clone()));
            by_cat_last.insert(k.clone(), (g.clone(), v.clone()));
        }
    }
    last.page = page.clone();
    last.by_cat = by_cat_last;
    let by_cat = group(by_cat_members);
    let by_country = group(
        page.iter()
            .map(|(k, row)| {
                (
                    k.clone(),
                    path(row, "country.name").and_then(key_text),
                    select(row, &[("id", "id"), ("brand.name", "brand")]),
                )
            })
            .collect(),
    );
    let mut peers = BTreeMap::new();
    for (k, b) in &m["products"] {
        if not_json(b) {
            if let Some(row) = last.peers.get(k) {
                peers.insert(k.clone(), row.clone());
            }
            continue;
        }
        let Some(mut row) = object(b) else { continue };
        let g = path(&row, "category").and_then(key_text);
        let v = g
            .and_then(|g| by_cat.get(&g).cloned())
            .unwrap_or(Value::Null);
        row.insert("peers".into(), v);
        peers.insert(k.clone(), select(&row, &[("id", "id"), ("peers", "peers")]));
    }
    last.peers = peers.clone();
    HashMap::from([
        (
            "page",
            page.into_iter()
                .map(|(k, v)| (k, Value::Object(v)))
                .collect(),
        ),
        ("by_cat", by_cat),
        ("by_country", by_country),
        ("peers", peers),
    ])
}

// ----- random data -----

fn bytes_of(v: Value) -> Bytes {
    Bytes::from(v.to_string())
}

fn value_for(topic: usize) -> BoxedStrategy<Bytes> {
    let junk = prop_oneof![
        Just(Bytes::from_static(b"\xffnot json")),
        Just(bytes_of(json!(5)))
    ];
    let good = match topic {
        0 => (
            0..7usize,
            prop::sample::select(vec!["active", "active", "discontinued"]),
            0..4usize,
            prop_oneof![
                Just(json!("x")),
                Just(json!("y")),
                Just(json!(1)),
                Just(Value::Null)
            ],
        )
            .prop_map(|(id, status, b, cat)| {
                let mut o =
                    json!({"id": format!("p{id}"), "status": status, "brand_id": format!("b{b}")});
                if !cat.is_null() {
                    o["category"] = cat;
                }
                o
            })
            .boxed(),
        1 => (0..100u32).prop_map(|a| json!({ "amount": a })).boxed(),
        2 => (
            prop::sample::select(vec!["Acme", "Zenith", "Nova"]),
            prop::option::of(0..4usize),
        )
            .prop_map(|(name, c)| match c {
                Some(c) => json!({"name": name, "country_id": format!("c{c}")}),
                None => json!({ "name": name }),
            })
            .boxed(),
        _ => prop::sample::select(vec!["Germany", "Sweden", "Japan"])
            .prop_map(|n| json!({ "name": n }))
            .boxed(),
    };
    prop_oneof![9 => good.prop_map(bytes_of), 1 => junk].boxed()
}

fn key_for(topic: usize) -> BoxedStrategy<String> {
    match topic {
        0 | 1 => (0..7usize).prop_map(|i| format!("p{i}")).boxed(),
        2 => (0..4usize).prop_map(|i| format!("b{i}")).boxed(),
        _ => (0..4usize).prop_map(|i| format!("c{i}")).boxed(),
    }
}

#[derive(Debug, Clone)]
enum Step {
    /// Batches applied in one writer step.
    Batches(Vec<(usize, Changes)>),
    /// A snapshot replacing a whole topic.
    Load(usize, Vec<(String, Bytes)>),
}

fn change(topic: usize) -> impl Strategy<Value = (String, Option<Bytes>)> {
    (
        key_for(topic),
        prop::option::weighted(0.75, value_for(topic)),
    )
}

fn batch() -> impl Strategy<Value = (usize, Changes)> {
    (0..4usize).prop_flat_map(|t| (Just(t), prop::collection::vec(change(t), 1..4)))
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => prop::collection::vec(batch(), 1..4).prop_map(Step::Batches),
        1 => (0..4usize).prop_flat_map(|t| {
            (
                Just(t),
                prop::collection::vec((key_for(t), value_for(t)), 0..8),
            )
        })
        .prop_map(|(t, e)| Step::Load(t, e)),
    ]
}

fn actual(s: &Standalone, view: &str) -> BTreeMap<String, Value> {
    let src = s.store().source(view).unwrap();
    let ks = src.keyspace();
    ks.keys()
        .into_iter()
        .map(|k| {
            let row = ks.get(&k).unwrap();
            let v = serde_json::from_slice(&row.value).expect("view rows are JSON");
            (k.to_string(), v)
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn views_equal_a_from_scratch_recompute(steps in prop::collection::vec(step(), 1..30)) {
        let mut s = Standalone::new(&TOPICS, &specs(), Vec::new()).unwrap();
        let mut model: Model = TOPICS.iter().map(|t| (*t, Topic::new())).collect();
        let mut versions: HashMap<(String, String), u64> = HashMap::new();
        let mut last = Last::default();
        for st in steps {
            let before: HashMap<&str, BTreeMap<String, Value>> =
                ["page", "by_cat", "by_country", "peers"].into_iter().map(|v| (v, actual(&s, v))).collect();
            let events = match st {
                Step::Batches(batches) => {
                    for (t, changes) in &batches {
                        let topic = model.get_mut(TOPICS[*t]).unwrap();
                        for (k, v) in changes {
                            match v {
                                Some(v) => { topic.insert(k.clone(), v.clone()); }
                                None => { topic.remove(k); }
                            }
                        }
                    }
                    s.apply_many(batches.into_iter().map(|(t, c)| (TOPICS[t], c)).collect()).unwrap()
                }
                Step::Load(t, entries) => {
                    let topic = model.get_mut(TOPICS[t]).unwrap();
                    topic.clear();
                    for (k, v) in &entries {
                        topic.insert(k.clone(), v.clone());
                    }
                    s.load(TOPICS[t], entries).unwrap()
                }
            };
            let want = expected(&model, &mut last);
            for (view, rows) in &want {
                prop_assert_eq!(&actual(&s, view), rows, "view {}", view);
            }
            // Each view change is a real change, and per-key versions only grow.
            for e in events.iter().filter(|e| want.contains_key(&*e.source)) {
                let old = before[&*e.source].get(&*e.key);
                let new = e.value.as_ref().map(|b| serde_json::from_slice::<Value>(b).unwrap());
                prop_assert!(old != new.as_ref(), "{}[{}] emitted unchanged", e.source, e.key);
                let last = versions.entry((e.source.to_string(), e.key.to_string())).or_insert(0);
                prop_assert!(e.version > *last, "{}[{}] version went from {} to {}", e.source, e.key, last, e.version);
                *last = e.version;
            }
            // ... and every row that changed emitted one, carrying its new value (None = gone).
            for (view, rows) in &want {
                let old = &before[view];
                let keys: std::collections::BTreeSet<&String> = old.keys().chain(rows.keys()).collect();
                for key in keys {
                    let (was, now) = (old.get(key), rows.get(key));
                    if was == now {
                        continue;
                    }
                    let emitted = events.iter().rev().find(|e| &*e.source == *view && &*e.key == key.as_str());
                    prop_assert!(emitted.is_some(), "{}[{}] changed from {:?} to {:?} without an event", view, key, was, now);
                    let value = emitted
                        .and_then(|e| e.value.as_ref())
                        .map(|b| serde_json::from_slice::<Value>(b).unwrap());
                    prop_assert_eq!(value.as_ref(), now, "{}[{}]: the last event is not the new value", view, key);
                }
            }
        }
    }
}
