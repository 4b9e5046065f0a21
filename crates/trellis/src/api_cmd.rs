//! Runs one API verb: builds the client from the global flags, sends the
//! request, prints the answer as a table or as the API's JSON unchanged.

use std::io::Write;

use serde_json::Value;

use crate::cli::{GlobalArgs, OutputFormat};
use crate::client::{ApiClient, ApiRequest, CaSource, ClientError};
use crate::nouns::{VpcEndpointVerb, encode_segment};
use crate::output::render_table;

/// Builds the API client from `--url`, `--api-key` and `--ca-cert`, saying what is missing.
pub fn client_from_flags(global: &GlobalArgs) -> Result<ApiClient, ClientError> {
    let url = global.url.clone().ok_or_else(|| {
        ClientError::Config(
            "--url (TRELLIS_URL) is required: the control plane's URL, as printed by `trellis server`".into(),
        )
    })?;
    if global.api_key.is_none() {
        return Err(ClientError::Config(
            "--api-key (TRELLIS_API_KEY) is required: an account's API key, or the admin key in DATA_DIR/admin.key"
                .into(),
        ));
    }
    let ca = global.ca_cert.clone().map_or(CaSource::None, CaSource::File);
    ApiClient::new(url, global.api_key.clone(), &ca)
}

/// `vpc-endpoint create --resource-configuration` takes an id too; the API field wants the ARN.
pub async fn resolve_identifiers(client: &ApiClient, verb: &mut VpcEndpointVerb) -> Result<(), ClientError> {
    if let VpcEndpointVerb::Create { resource_configuration, .. } = verb
        && !resource_configuration.starts_with("arn:")
    {
        let path = format!("/v1/resourceconfigurations/{}", encode_segment(resource_configuration));
        let rcfg = client.call(&ApiRequest::get(&path)).await?;
        match rcfg.get("arn").and_then(Value::as_str) {
            Some(arn) => *resource_configuration = arn.to_string(),
            None => {
                return Err(ClientError::Decode {
                    reason: format!("resource configuration {resource_configuration} has no arn"),
                });
            }
        }
    }
    Ok(())
}

/// Sends `req` and prints the answer on stdout.
pub async fn run(client: &ApiClient, req: &ApiRequest, output: OutputFormat) -> Result<(), ClientError> {
    let answer = client.send(req).await?;
    let text = match output {
        OutputFormat::Json => {
            let mut body = answer.body;
            if !body.is_empty() && !body.ends_with('\n') {
                body.push('\n');
            }
            body
        }
        OutputFormat::Table => {
            let value = answer.json()?;
            let mut text = render_table(&value);
            text.push_str(&hints(req, &value, client.base_url()));
            text
        }
    };
    let mut stdout = std::io::stdout().lock();
    // A closed pipe (`| head`) is not an error worth reporting.
    let _ = stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush());
    Ok(())
}

/// A line after the table where the answer holds something shown only once, or
/// where the next step is not obvious.
fn hints(req: &ApiRequest, value: &Value, url: &str) -> String {
    let field = |k: &str| value.get(k).and_then(Value::as_str);
    if req.method == reqwest::Method::DELETE && value.is_null() {
        let id = req.path.rsplit('/').next().unwrap_or_default();
        return format!("Deleted {id}.\n");
    }
    if let Some(token) = field("token") {
        return format!(
            "\nThe token is shown once and works once. Enroll an agent with:\n  trellis agent --control-plane {url} --join-token {token} --state-dir DIR\n"
        );
    }
    if field("apiKey").is_some() {
        return "\nThe apiKey is shown once: store it now.\n".to_string();
    }
    String::new()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn deletes_with_an_empty_answer_say_what_was_deleted() {
        assert_eq!(hints(&ApiRequest::delete("/v1/vpcs/vpc-1"), &Value::Null, "https://h:1"), "Deleted vpc-1.\n");
    }

    #[test]
    fn secrets_shown_once_get_a_hint() {
        let req = ApiRequest::post("/v1/agent-tokens", json!({}));
        let hint = hints(&req, &json!({"token": "trellis1.x"}), "https://h:1");
        assert!(hint.contains("--control-plane https://h:1 --join-token trellis1.x"), "{hint}");
        let req = ApiRequest::post("/v1/accounts", json!({}));
        assert!(hints(&req, &json!({"apiKey": "k"}), "https://h:1").contains("shown once"));
    }
}
