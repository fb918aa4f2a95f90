//! Adds the Bulk Data and SMART entries to an upstream CapabilityStatement (SPEC A2):
//! `instantiates` the bulk-data CapabilityStatement; the system `export` operation; Patient and Group
//! `export` operations under both names (`export` for Inferno, `patient-export` / `group-export` for
//! BDT, same canonical definition); the SMART `oauth-uris` security extension with the proxy's token
//! endpoint. Editing is idempotent: entries already present are not duplicated.

use serde_json::{Map, Value, json};

pub const BULK_DATA_CAPABILITY: &str =
    "http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data";
const EXPORT_DEF: &str = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export";
const PATIENT_EXPORT_DEF: &str =
    "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export";
const GROUP_EXPORT_DEF: &str = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export";
const OAUTH_URIS: &str = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris";

/// The parts of a CapabilityStatement the proxy reads: the resource types and their search
/// parameters. The rest of the document (hfs: 2.5 MB, mostly SearchParameter definitions) is
/// skipped as it is read, never built.
#[derive(serde::Deserialize)]
pub struct Outline {
    #[serde(default, rename = "resourceType")]
    resource_type: String,
    #[serde(default)]
    rest: Vec<OutlineRest>,
}

#[derive(serde::Deserialize)]
struct OutlineRest {
    mode: Option<String>,
    #[serde(default, rename = "searchParam")]
    search_param: Vec<Named>,
    #[serde(default)]
    resource: Vec<OutlineResource>,
}

#[derive(serde::Deserialize)]
struct OutlineResource {
    #[serde(rename = "type")]
    resource_type: Option<String>,
    #[serde(default, rename = "searchParam")]
    search_param: Vec<Named>,
}

#[derive(serde::Deserialize)]
struct Named {
    name: Option<String>,
}

impl Outline {
    /// The outline of `json` when it is a CapabilityStatement.
    pub fn parse(json: &[u8]) -> Option<Self> {
        serde_json::from_slice::<Self>(json)
            .ok()
            .filter(|s| s.resource_type == "CapabilityStatement")
    }

    fn servers(&self) -> impl Iterator<Item = &OutlineRest> {
        self.rest
            .iter()
            .filter(|r| r.mode.as_deref() == Some("server"))
    }

    /// The resource types it serves.
    pub fn types(&self) -> Vec<String> {
        self.servers()
            .flat_map(|r| &r.resource)
            .filter_map(|r| r.resource_type.clone())
            .collect()
    }

    /// The types it lists search parameters for (for them, or for every type) without
    /// `_lastUpdated`: those the upstream cannot search by it.
    pub fn types_without_last_updated(&self) -> Vec<String> {
        let has = |params: &[Named]| {
            params
                .iter()
                .any(|p| p.name.as_deref() == Some("_lastUpdated"))
        };
        let mut out = Vec::new();
        for rest in self.servers().filter(|r| !has(&r.search_param)) {
            let common = !rest.search_param.is_empty();
            for resource in &rest.resource {
                let Some(resource_type) = &resource.resource_type else {
                    continue;
                };
                let listed = common || !resource.search_param.is_empty();
                if listed && !has(&resource.search_param) {
                    out.push(resource_type.clone());
                }
            }
        }
        out
    }
}

/// Adds the bulk-data and SMART entries. `token_url` is the proxy's absolute token endpoint, or
/// `None` when the proxy serves none (`auth.enabled = false`): then no SMART security entries are
/// added (the upstream's own are left as they are).
pub fn augment(cs: &mut Value, token_url: Option<&str>) {
    let Some(root) = cs.as_object_mut() else {
        return;
    };
    push_unique(array_at(root, "instantiates"), json!(BULK_DATA_CAPABILITY));

    let rest = array_at(root, "rest");
    let server = match rest
        .iter()
        .position(|r| r.get("mode").and_then(Value::as_str) == Some("server"))
    {
        Some(index) => index,
        None => {
            rest.push(json!({ "mode": "server" }));
            rest.len() - 1
        }
    };
    // BDT reads rest[0]: keep the server entry first.
    rest.swap(0, server);
    let Some(server) = rest[0].as_object_mut() else {
        return;
    };

    add_operation(server, "export", EXPORT_DEF);
    let resources = array_at(server, "resource");
    for (resource_type, name, definition) in [
        ("Patient", "patient-export", PATIENT_EXPORT_DEF),
        ("Group", "group-export", GROUP_EXPORT_DEF),
    ] {
        let resource = match resources
            .iter()
            .position(|r| r.get("type").and_then(Value::as_str) == Some(resource_type))
        {
            Some(index) => index,
            None => {
                resources.push(json!({ "type": resource_type }));
                resources.len() - 1
            }
        };
        if let Some(resource) = resources[resource].as_object_mut() {
            add_operation(resource, "export", definition);
            add_operation(resource, name, definition);
        }
    }

    let Some(token_url) = token_url else {
        return;
    };
    let security = server
        .entry("security")
        .or_insert_with(|| json!({}))
        .as_object_mut();
    if let Some(security) = security {
        let extensions = array_at(security, "extension");
        extensions.retain(|e| e.get("url").and_then(Value::as_str) != Some(OAUTH_URIS));
        extensions.push(json!({
            "url": OAUTH_URIS,
            "extension": [{ "url": "token", "valueUri": token_url }]
        }));
        push_unique(
            array_at(security, "service"),
            json!({
                "coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                    "code": "SMART-on-FHIR"
                }]
            }),
        );
    }
}

fn add_operation(owner: &mut Map<String, Value>, name: &str, definition: &str) {
    let operations = array_at(owner, "operation");
    operations.retain(|op| op.get("name").and_then(Value::as_str) != Some(name));
    operations.push(json!({ "name": name, "definition": definition }));
}

/// The array at `key`, created (or replaced when it is not an array) as needed.
fn array_at<'a>(object: &'a mut Map<String, Value>, key: &str) -> &'a mut Vec<Value> {
    let slot = object.entry(key).or_insert_with(|| json!([]));
    if !slot.is_array() {
        *slot = json!([]);
    }
    match slot {
        Value::Array(items) => items,
        _ => unreachable!("replaced by an array above"),
    }
}

fn push_unique(items: &mut Vec<Value>, value: Value) {
    if !items.contains(&value) {
        items.push(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream() -> Value {
        json!({
            "resourceType": "CapabilityStatement",
            "status": "active",
            "rest": [{
                "mode": "server",
                "resource": [
                    { "type": "Patient", "interaction": [{ "code": "read" }] },
                    { "type": "Observation" }
                ],
                "operation": [{ "name": "everything", "definition": "http://x/everything" }]
            }]
        })
    }

    fn op_names(owner: &Value) -> Vec<&str> {
        owner["operation"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["name"].as_str().unwrap())
            .collect()
    }

    #[test]
    fn adds_every_bulk_and_smart_entry() {
        let mut cs = upstream();
        augment(&mut cs, Some("https://proxy/fhir/token"));
        assert_eq!(cs["instantiates"][0], BULK_DATA_CAPABILITY);
        let rest = &cs["rest"][0];
        assert_eq!(op_names(rest), ["everything", "export"]);
        let patient = rest["resource"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["type"] == "Patient")
            .unwrap();
        assert_eq!(op_names(patient), ["export", "patient-export"]);
        assert_eq!(
            patient["interaction"][0]["code"], "read",
            "upstream content kept"
        );
        let group = rest["resource"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["type"] == "Group")
            .unwrap();
        assert_eq!(op_names(group), ["export", "group-export"]);
        assert_eq!(group["operation"][1]["definition"], GROUP_EXPORT_DEF);
        let ext = &rest["security"]["extension"][0];
        assert_eq!(ext["url"], OAUTH_URIS);
        assert_eq!(ext["extension"][0]["valueUri"], "https://proxy/fhir/token");
    }

    #[test]
    fn without_a_token_endpoint_no_smart_security_is_advertised() {
        let mut cs = upstream();
        augment(&mut cs, None);
        let rest = &cs["rest"][0];
        assert_eq!(op_names(rest), ["everything", "export"]);
        assert!(rest.get("security").is_none(), "{cs}");
        assert!(!cs.to_string().contains(OAUTH_URIS));
        assert!(!cs.to_string().contains("SMART-on-FHIR"));
    }

    #[test]
    fn is_idempotent() {
        let mut once = upstream();
        augment(&mut once, Some("https://p/token"));
        let mut twice = once.clone();
        augment(&mut twice, Some("https://p/token"));
        assert_eq!(once, twice);
    }

    #[test]
    fn creates_a_server_rest_entry_when_missing() {
        let mut cs =
            json!({ "resourceType": "CapabilityStatement", "rest": [{ "mode": "client" }] });
        augment(&mut cs, Some("https://p/token"));
        assert_eq!(cs["rest"][0]["mode"], "server");
        assert_eq!(cs["rest"][1]["mode"], "client");
    }
}
