//! The vector store behind a small trait: pure request builders and response parsers, so a
//! store is tested without a network and another HTTP vector store (Qdrant, Weaviate,
//! Milvus, a pgvector service...) is one more implementation of [`VectorStore`].
//!
//! [`Chroma`] speaks Chroma's HTTP API v2 (Chroma ≥ 1.0: `chroma run`, the Docker image,
//! Chroma Cloud): collections are opened by name (created with the cosine space when asked),
//! items are upserted with a vector, a document and metadata, and queried by vector with a
//! metadata filter; distances are cosine distances (`1 - cosine similarity`, 0 = same
//! direction).

use super::upstream::{HttpCall, Upstream, UpstreamDefaults, UPSTREAM_FIELDS};
use crate::config::{ConfigError, Obj};
use serde_json::{json, Map, Value};
use std::time::Duration;

/// One stored item.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// Stable id (an upsert with the same id replaces the item).
    pub id: String,
    /// The embedding.
    pub vector: Vec<f32>,
    /// The document (text or an encoded record).
    pub document: String,
    /// Scalar metadata (strings and integers).
    pub metadata: Map<String, Value>,
}

/// One query result.
#[derive(Debug, Clone, PartialEq)]
pub struct Match {
    /// Item id.
    pub id: String,
    /// Cosine distance to the query vector.
    pub distance: f32,
    /// The document, when returned.
    pub document: Option<String>,
    /// The metadata, when returned.
    pub metadata: Map<String, Value>,
}

/// A metadata filter: every condition must hold.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    /// `key == value`.
    pub equals: Vec<(String, Value)>,
    /// `key > value` (integers).
    pub greater_than: Vec<(String, i64)>,
}

/// Why a store answer could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// No answer (timeout, reset, no upstream).
    Unreachable,
    /// The collection does not exist (or its id went stale).
    NoCollection,
    /// Another non-2xx status, with the start of the answer (for the log).
    Status(u16, String),
    /// A 2xx body that is not what the API returns.
    Malformed(String),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unreachable => f.write_str("no response (timeout, reset or no upstream)"),
            Self::NoCollection => f.write_str("collection not found"),
            Self::Status(s, body) if body.is_empty() => write!(f, "status {s}"),
            Self::Status(s, body) => write!(f, "status {s}: {body}"),
            Self::Malformed(why) => write!(f, "malformed answer: {why}"),
        }
    }
}

/// A vector store spoken over HTTP.
pub trait VectorStore {
    /// Short name for logs (`chroma`).
    fn kind(&self) -> &'static str;
    /// Where the calls go.
    fn upstream(&self) -> &Upstream;
    /// Open collection `name` (create it, cosine space, when `create`).
    fn open_collection(&self, name: &str, create: bool) -> HttpCall;
    /// The collection id from the answer to [`VectorStore::open_collection`].
    fn parse_collection(&self, status: Option<u16>, body: Option<&[u8]>) -> Result<String, StoreError>;
    /// The `n` items nearest to `vector` that pass `filter`, with documents and metadata.
    fn query(&self, collection: &str, vector: &[f32], n: usize, filter: &Filter) -> HttpCall;
    /// The matches of a query answer, nearest first.
    fn parse_query(&self, status: Option<u16>, body: Option<&[u8]>) -> Result<Vec<Match>, StoreError>;
    /// Insert or replace `items`.
    fn upsert(&self, collection: &str, items: &[Item]) -> HttpCall;
    /// Delete the items whose integer metadata `key` is below `value` (TTL cleanup).
    fn delete_below(&self, collection: &str, key: &str, value: i64) -> HttpCall;
    /// Whether a write answer (upsert, delete) succeeded.
    fn parse_write(&self, status: Option<u16>, body: Option<&[u8]>) -> Result<(), StoreError>;
}

/// Chroma, HTTP API v2.
#[derive(Debug, Clone, PartialEq)]
pub struct Chroma {
    /// Where the server is.
    pub upstream: Upstream,
    /// Chroma tenant.
    pub tenant: String,
    /// Chroma database.
    pub database: String,
}

/// The store's config fields besides the upstream ones.
const CHROMA_FIELDS: &[&str] = &["type", "tenant", "database", "collection"];

/// Read a `store` block: `{"type": "chroma", "cluster": ..., "collection": ...}`. Returns the
/// store and the `collection` field (required when `collection_required`).
pub fn load_store(
    o: Obj<'_>,
    env: &dyn Fn(&str) -> Option<String>,
    default_collection: Option<&str>,
) -> Result<(Chroma, Option<String>), ConfigError> {
    let known: Vec<&str> = UPSTREAM_FIELDS.iter().chain(CHROMA_FIELDS).copied().collect();
    o.known(&known)?;
    o.choice("type", &["chroma"])?;
    let upstream = Upstream::load(
        &o,
        env,
        &UpstreamDefaults {
            authority: "chroma",
            timeout: Duration::from_millis(500),
            credential_header: "x-chroma-token",
            credential_prefix: "",
        },
    )?;
    let name = |k: &str, d: &str| -> Result<String, ConfigError> {
        let v = o.non_empty(k)?.unwrap_or_else(|| d.to_string());
        if v.contains('/') || v.contains('?') || v.contains('#') || v.contains('%') {
            return Err(o.err(k, "must not contain / ? # or %"));
        }
        Ok(v)
    };
    let tenant = name("tenant", "default_tenant")?;
    let database = name("database", "default_database")?;
    let collection = match o.non_empty("collection")?.or_else(|| default_collection.map(str::to_string)) {
        Some(c) => Some(check_collection_name(&c).map_err(|why| o.err("collection", why))?),
        None => None,
    };
    Ok((Chroma { upstream, tenant, database }, collection))
}

/// Chroma's rule for collection names: 3–512 characters from `[a-zA-Z0-9._-]`, starting and
/// ending with a letter or digit.
pub fn check_collection_name(name: &str) -> Result<String, String> {
    let ok_len = (3..=512).contains(&name.len());
    let ok_chars = name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    let ends = name.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && name.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric());
    if ok_len && ok_chars && ends {
        Ok(name.to_string())
    } else {
        Err(format!(
            "invalid collection name {name:?}: 3-512 characters from [a-zA-Z0-9._-], starting and ending with a letter or digit"
        ))
    }
}

fn ok(status: Option<u16>, body: Option<&[u8]>) -> Result<(), StoreError> {
    match status {
        None => Err(StoreError::Unreachable),
        Some(s) if (200..300).contains(&s) => Ok(()),
        Some(404) => Err(StoreError::NoCollection),
        Some(s) => {
            let text = body.map(crate::json::lossy).unwrap_or_default();
            Err(StoreError::Status(s, crate::json::cut(text.trim(), 200).to_string()))
        }
    }
}

fn body_json(body: Option<&[u8]>) -> Result<Value, StoreError> {
    body.and_then(|b| serde_json::from_slice(b).ok()).ok_or_else(|| StoreError::Malformed("not JSON".into()))
}

fn where_clause(filter: &Filter) -> Option<Value> {
    let mut conds: Vec<Value> = Vec::new();
    for (k, v) in &filter.equals {
        conds.push(json!({ k: {"$eq": v} }));
    }
    for (k, v) in &filter.greater_than {
        conds.push(json!({ k: {"$gt": v} }));
    }
    match conds.len() {
        0 => None,
        1 => conds.pop(),
        _ => Some(json!({"$and": conds})),
    }
}

/// Chroma's "collection does not exist" answers: 404, or a 400/500 whose message says so
/// (a stale id after the server lost its data).
fn is_missing_collection(status: Option<u16>, body: Option<&[u8]>) -> bool {
    if status == Some(404) {
        return true;
    }
    let text = body.map(crate::json::lossy).unwrap_or_default().to_ascii_lowercase();
    status.is_some_and(|s| s >= 400)
        && text.contains("collection")
        && (text.contains("not exist") || text.contains("not found"))
}

impl Chroma {
    fn collections(&self) -> String {
        format!("/api/v2/tenants/{}/databases/{}/collections", self.tenant, self.database)
    }
}

impl VectorStore for Chroma {
    fn kind(&self) -> &'static str {
        "chroma"
    }

    fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    fn open_collection(&self, name: &str, create: bool) -> HttpCall {
        if create {
            // get_or_create keeps an existing collection as it is; a new one uses cosine.
            let body = json!({"name": name, "get_or_create": true, "configuration": {"hnsw": {"space": "cosine"}}});
            HttpCall::post(self.collections(), &body)
        } else {
            HttpCall::get(format!("{}/{name}", self.collections()))
        }
    }

    fn parse_collection(&self, status: Option<u16>, body: Option<&[u8]>) -> Result<String, StoreError> {
        if is_missing_collection(status, body) {
            return Err(StoreError::NoCollection);
        }
        ok(status, body)?;
        let v = body_json(body)?;
        v.get("id")
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'))
            .map(str::to_string)
            .ok_or_else(|| StoreError::Malformed("no collection id".into()))
    }

    fn query(&self, collection: &str, vector: &[f32], n: usize, filter: &Filter) -> HttpCall {
        let mut body = json!({
            "query_embeddings": [vector],
            "n_results": n.max(1),
            "include": ["documents", "metadatas", "distances"],
        });
        if let (Some(w), Some(o)) = (where_clause(filter), body.as_object_mut()) {
            o.insert("where".into(), w);
        }
        HttpCall::post(format!("{}/{collection}/query", self.collections()), &body)
    }

    fn parse_query(&self, status: Option<u16>, body: Option<&[u8]>) -> Result<Vec<Match>, StoreError> {
        if is_missing_collection(status, body) {
            return Err(StoreError::NoCollection);
        }
        ok(status, body)?;
        let v = body_json(body)?;
        // Results are lists per query embedding; we send one.
        let first = |k: &str| v.get(k).and_then(Value::as_array).and_then(|a| a.first()).and_then(Value::as_array);
        let ids = first("ids").ok_or_else(|| StoreError::Malformed("no ids".into()))?;
        let distances = first("distances").ok_or_else(|| StoreError::Malformed("no distances".into()))?;
        let documents = first("documents");
        let metadatas = first("metadatas");
        let mut out = Vec::with_capacity(ids.len());
        for (i, id) in ids.iter().enumerate() {
            let id = id.as_str().ok_or_else(|| StoreError::Malformed("id is not a string".into()))?;
            let distance = distances
                .get(i)
                .and_then(Value::as_f64)
                .filter(|d| d.is_finite())
                .ok_or_else(|| StoreError::Malformed("distance is not a number".into()))?;
            let document = documents.and_then(|d| d.get(i)).and_then(Value::as_str).map(str::to_string);
            let metadata = metadatas.and_then(|m| m.get(i)).and_then(Value::as_object).cloned().unwrap_or_default();
            out.push(Match { id: id.to_string(), distance: distance as f32, document, metadata });
        }
        out.sort_by(|a, b| a.distance.total_cmp(&b.distance));
        Ok(out)
    }

    fn upsert(&self, collection: &str, items: &[Item]) -> HttpCall {
        let body = json!({
            "ids": items.iter().map(|i| i.id.clone()).collect::<Vec<_>>(),
            "embeddings": items.iter().map(|i| i.vector.clone()).collect::<Vec<_>>(),
            "documents": items.iter().map(|i| i.document.clone()).collect::<Vec<_>>(),
            "metadatas": items.iter().map(|i| Value::Object(i.metadata.clone())).collect::<Vec<_>>(),
        });
        HttpCall::post(format!("{}/{collection}/upsert", self.collections()), &body)
    }

    fn delete_below(&self, collection: &str, key: &str, value: i64) -> HttpCall {
        HttpCall::post(format!("{}/{collection}/delete", self.collections()), &json!({"where": {key: {"$lt": value}}}))
    }

    fn parse_write(&self, status: Option<u16>, body: Option<&[u8]>) -> Result<(), StoreError> {
        if is_missing_collection(status, body) {
            return Err(StoreError::NoCollection);
        }
        ok(status, body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::read;

    fn chroma() -> Chroma {
        read(br#"{"type":"chroma","cluster":"chroma","tenant":"t1","database":"d1"}"#, |o| {
            load_store(o, &|_| None, None)
        })
        .unwrap()
        .0
    }

    fn body(call: &HttpCall) -> Value {
        serde_json::from_slice(call.body.as_ref().unwrap()).unwrap()
    }

    #[test]
    fn config() {
        let (c, coll) = read(br#"{"cluster":"chroma"}"#, |o| load_store(o, &|_| None, Some("sluice-cache"))).unwrap();
        assert_eq!(
            (c.tenant.as_str(), c.database.as_str(), coll.as_deref()),
            ("default_tenant", "default_database", Some("sluice-cache"))
        );
        assert_eq!(c.upstream.timeout, Duration::from_millis(500));
        for (doc, field) in [
            (r#"{"cluster":"c","type":"qdrant"}"#, "type"),
            (r#"{"cluster":"c","collection":"ab"}"#, "collection"),
            (r#"{"cluster":"c","collection":"-abc"}"#, "collection"),
            (r#"{"cluster":"c","tenant":"a/b"}"#, "tenant"),
            (r#"{"cluster":"c","colection":"abc"}"#, "colection"),
        ] {
            assert_eq!(read(doc.as_bytes(), |o| load_store(o, &|_| None, None)).unwrap_err().field, field, "{doc}");
        }
        assert!(check_collection_name("french-cheeses").is_ok());
        assert!(check_collection_name("a b c").is_err());
    }

    #[test]
    fn open_collection_requests_and_answers() {
        let c = chroma();
        let create = c.open_collection("sluice-cache", true);
        assert_eq!((create.method, create.path.as_str()), ("POST", "/api/v2/tenants/t1/databases/d1/collections"));
        assert_eq!(
            body(&create),
            json!({"name": "sluice-cache", "get_or_create": true, "configuration": {"hnsw": {"space": "cosine"}}})
        );
        let get = c.open_collection("docs", false);
        assert_eq!(
            (get.method, get.path.as_str(), get.body.is_none()),
            ("GET", "/api/v2/tenants/t1/databases/d1/collections/docs", true)
        );
        let answer = br#"{"id":"ba149481-12d2-4fc3-ad05-39a7ad3450a2","name":"x","configuration_json":{}}"#;
        assert_eq!(c.parse_collection(Some(200), Some(answer)).unwrap(), "ba149481-12d2-4fc3-ad05-39a7ad3450a2");
        assert_eq!(c.parse_collection(Some(404), Some(b"{}")), Err(StoreError::NoCollection));
        let missing = br#"{"error":"NotFoundError","message":"Collection [docs] does not exists"}"#;
        assert_eq!(c.parse_collection(Some(400), Some(missing)), Err(StoreError::NoCollection));
        assert_eq!(c.parse_collection(None, None), Err(StoreError::Unreachable));
        assert_eq!(c.parse_collection(Some(500), Some(b"oops")), Err(StoreError::Status(500, "oops".into())));
        assert_eq!(StoreError::Status(500, "oops".into()).to_string(), "status 500: oops");
        assert!(matches!(c.parse_collection(Some(200), Some(br#"{"id":"../x"}"#)), Err(StoreError::Malformed(_))));
    }

    #[test]
    fn query_request_and_answer() {
        let c = chroma();
        let f = Filter { equals: vec![("scope".into(), json!("abc"))], greater_than: vec![("exp".into(), 1000)] };
        let q = c.query("ID", &[1.0, 0.5], 1, &f);
        assert_eq!(q.path, "/api/v2/tenants/t1/databases/d1/collections/ID/query");
        assert_eq!(
            body(&q),
            json!({"query_embeddings": [[1.0, 0.5]], "n_results": 1, "include": ["documents", "metadatas", "distances"],
                   "where": {"$and": [{"scope": {"$eq": "abc"}}, {"exp": {"$gt": 1000}}]}})
        );
        let one = Filter { equals: vec![("scope".into(), json!("abc"))], ..Filter::default() };
        assert_eq!(body(&c.query("ID", &[1.0], 3, &one))["where"], json!({"scope": {"$eq": "abc"}}));
        assert!(body(&c.query("ID", &[1.0], 3, &Filter::default())).get("where").is_none());

        let answer = br#"{"ids":[["b","a"]],"embeddings":null,"documents":[["doc b","doc a"]],"uris":null,
            "metadatas":[[{"exp":200},{"exp":100}]],"distances":[[0.4,0.0]],"include":["documents","metadatas","distances"]}"#;
        let m = c.parse_query(Some(200), Some(answer)).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!((m[0].id.as_str(), m[0].distance, m[0].document.as_deref()), ("a", 0.0, Some("doc a")));
        assert_eq!(m[1].metadata["exp"], 200);
        let empty = br#"{"ids":[[]],"embeddings":null,"documents":[[]],"uris":null,"metadatas":null,"distances":[[]]}"#;
        assert!(c.parse_query(Some(200), Some(empty)).unwrap().is_empty());
        let stale = br#"{"error":"InvalidArgumentError","message":"Collection 383772b2 does not exist."}"#;
        assert_eq!(c.parse_query(Some(400), Some(stale)), Err(StoreError::NoCollection));
        assert!(matches!(
            c.parse_query(Some(400), Some(br#"{"error":"dimension mismatch"}"#)),
            Err(StoreError::Status(400, _))
        ));
        assert!(matches!(
            c.parse_query(Some(200), Some(br#"{"ids":[["a"]],"distances":[["x"]]}"#)),
            Err(StoreError::Malformed(_))
        ));
        assert!(matches!(c.parse_query(Some(200), Some(b"[]")), Err(StoreError::Malformed(_))));
    }

    #[test]
    fn writes() {
        let c = chroma();
        let mut meta = Map::new();
        meta.insert("scope".into(), json!("s"));
        meta.insert("exp".into(), json!(5));
        let items = [Item { id: "k1".into(), vector: vec![0.25], document: "{}".into(), metadata: meta }];
        let u = c.upsert("ID", &items);
        assert_eq!(u.path, "/api/v2/tenants/t1/databases/d1/collections/ID/upsert");
        assert_eq!(
            body(&u),
            json!({"ids": ["k1"], "embeddings": [[0.25]], "documents": ["{}"], "metadatas": [{"scope": "s", "exp": 5}]})
        );
        let d = c.delete_below("ID", "exp", 77);
        assert_eq!(
            (d.path.as_str(), body(&d)),
            ("/api/v2/tenants/t1/databases/d1/collections/ID/delete", json!({"where": {"exp": {"$lt": 77}}}))
        );
        assert_eq!(c.parse_write(Some(201), Some(b"{}")), Ok(()));
        assert_eq!(c.parse_write(Some(404), None), Err(StoreError::NoCollection));
        assert_eq!(c.parse_write(None, None), Err(StoreError::Unreachable));
    }
}
