//! Runs one API verb: builds the client from the global flags, sends the
//! request, prints the answer as a table or as the API's JSON unchanged.

use std::io::Write;

use serde_json::Value;

use crate::cli::{GlobalArgs, OutputFormat};
use crate::client::{ApiClient, ApiRequest, CaSource, ClientError};
use crate::nouns::{EndpointTargetArgs, VpcEndpointVerb};
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

/// API fields and the flags that fill them, for error messages: at the CLI an
/// error names the flag the user typed, not the JSON field it became. Only
/// camelCase names (and `principals`), so that no English word is rewritten.
const FLAG_OF_FIELD: &[(&str, &str)] = &[
    ("portRanges", "--port-range"),
    ("resourceGatewayIdentifier", "--gateway"),
    ("resourceConfigurationGroupIdentifier", "--group"),
    ("resourceConfigurationDefinition", "--ip or --dns-name"),
    ("ipResource", "--ip"),
    ("dnsResource", "--dns-name"),
    ("ipAddress", "--ip"),
    ("domainName", "--dns-name"),
    ("customDomainName", "--custom-domain-name"),
    ("vpcIdentifier", "--vpc"),
    ("vpcId", "--vpc"),
    ("subnetIds", "--subnet"),
    ("subnetId", "--subnet"),
    ("cidrBlock", "--cidr-block"),
    ("resourceArns", "--resource-arn"),
    ("principals", "--principal"),
    ("resourceConfigurationArn", "--resource-configuration"),
    ("serviceName", "--service-name"),
    ("targets", "--target"),
    ("ports", "--port"),
    ("acceptanceRequired", "--acceptance-required"),
    ("loadBalancing", "--load-balancing"),
    ("healthCheck", "--health-check-*"),
    ("proxyProtocol", "--proxy-protocol"),
    ("perConsumerLimits", "--max-connections or --max-bits-per-second"),
    ("maxConnections", "--max-connections"),
    ("maxBitsPerSecond", "--max-bits-per-second"),
    ("privateDnsName", "--private-dns-name"),
    ("addAllowedPrincipals", "--add-principal"),
    ("removeAllowedPrincipals", "--remove-principal"),
    ("vpcEndpointIds", "--endpoint"),
    ("expiresInSeconds", "--expires-in"),
    ("organizationId", "--organization-id"),
    ("privateDnsEnabled", "--private-dns-enabled"),
    ("maxResults", "--max-results"),
    ("nextToken", "--next-token"),
    ("clientToken", "--client-token"),
];

/// Fields whose flag depends on the route (the collection path they were sent to).
const FLAG_OF_FIELD_ON: &[(&str, &str, &str)] = &[
    ("/v1/domainverifications", "domainName", "--domain-name"),
    ("/v1/resourcegateways", "ipAddressType", "--ip-address-type"),
    ("/v1/resourceconfigurations", "ipAddressType", "--dns-ip-address-type"),
    ("/v1/connectionnotifications", "url", "--webhook-url"),
    ("/v1/connectionnotifications", "connectionEvents", "--event"),
    ("/v1/connectionnotifications", "serviceId", "--service-id"),
    ("/v1/connectionnotifications", "vpcEndpointId", "--vpc-endpoint-id"),
];

/// The flag that fills API field `field` in a request to `path`.
fn flag_of(field: &str, path: &str) -> Option<&'static str> {
    let on_route = FLAG_OF_FIELD_ON.iter().find(|(route, f, _)| *f == field && path.starts_with(route));
    match on_route {
        Some((_, _, flag)) => Some(flag),
        None => FLAG_OF_FIELD.iter().find(|(f, _)| *f == field).map(|(_, flag)| *flag),
    }
}

/// `message` (an error answered to a request to `path`) with every bare API
/// field name replaced by its flag. Names in quotes or backticks (JSON
/// examples, echoed input) are left as they are.
pub fn flag_names(message: &str, path: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    let mut previous: Option<char> = None;
    while let Some(c) = rest.chars().next() {
        if !c.is_ascii_alphabetic() {
            out.push(c);
            previous = Some(c);
            rest = &rest[c.len_utf8()..];
            continue;
        }
        let len = rest.find(|ch: char| !ch.is_ascii_alphanumeric()).unwrap_or(rest.len());
        let (word, after) = rest.split_at(len);
        let quoted = |ch: Option<char>| matches!(ch, Some('"' | '`' | '\'' | '-'));
        let bare = !quoted(previous) && !quoted(after.chars().next());
        match flag_of(word, path) {
            Some(flag) if bare => out.push_str(flag),
            _ => out.push_str(word),
        }
        previous = word.chars().last();
        rest = after;
    }
    out
}

/// An API error to a request to `path` as the CLI prints it: field names become flag names.
pub fn at_the_cli(path: &str) -> impl FnOnce(ClientError) -> ClientError + '_ {
    move |err| match err {
        ClientError::Api { status, code, message } => {
            ClientError::Api { status, code, message: flag_names(&message, path) }
        }
        other => other,
    }
}

/// `vpc-endpoint create --resource-configuration` takes an id too; the API field wants the ARN.
pub async fn resolve_identifiers(client: &ApiClient, verb: &mut VpcEndpointVerb) -> Result<(), ClientError> {
    if let VpcEndpointVerb::Create {
        target: EndpointTargetArgs { resource_configuration: Some(resource_configuration), .. },
        ..
    } = verb
        && !resource_configuration.starts_with("arn:")
    {
        let req = ApiRequest::at(&trellis_api::configurations::GET, resource_configuration);
        let rcfg = client.call(&req).await.map_err(at_the_cli(&req.path))?;
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
    let answer = client.send(req).await.map_err(at_the_cli(&req.path))?;
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
            text.push_str(&hints(req, &value, client.base_url(), &crate::program::command_name()));
            text
        }
    };
    let mut stdout = std::io::stdout().lock();
    // A closed pipe (`| head`) is not an error worth reporting.
    let _ = stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush());
    Ok(())
}

/// A line after the table where the answer holds something shown only once, or
/// where the next step is not obvious. `program` names this binary in commands.
fn hints(req: &ApiRequest, value: &Value, url: &str, program: &str) -> String {
    let field = |k: &str| value.get(k).and_then(Value::as_str);
    if req.method == reqwest::Method::DELETE && value.is_null() {
        let id = req.path.rsplit('/').next().unwrap_or_default();
        return format!("Deleted {id}.\n");
    }
    if let Some(token) = field("token") {
        // In the environment rather than a flag: other users see a process's flags in `ps`.
        return format!(
            "\nThe token is shown once and works once. Enroll an agent with (DIR: a directory of its own):\n  TRELLIS_JOIN_TOKEN={token} {program} agent --control-plane {url} --state-dir DIR\n"
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
    fn errors_name_the_flags_not_the_api_fields() {
        const RCFG: &str = "/v1/resourceconfigurations";
        assert_eq!(
            flag_names("portRanges is required for SINGLE and GROUP configurations, for example [\"5432\"]", RCFG),
            "--port-range is required for SINGLE and GROUP configurations, for example [\"5432\"]"
        );
        assert_eq!(
            flag_names("resourceGatewayIdentifier: \"rgw-x\" is not a valid resource gateway id", RCFG),
            "--gateway: \"rgw-x\" is not a valid resource gateway id"
        );
        assert_eq!(
            flag_names("a CHILD configuration inherits its GROUP's gateway; omit resourceGatewayIdentifier", RCFG),
            "a CHILD configuration inherits its GROUP's gateway; omit --gateway"
        );
        // JSON examples and echoed input keep their field names; plain words are not touched.
        let example = "resourceConfigurationDefinition is required: {\"ipResource\": {\"ipAddress\": ...}}";
        assert_eq!(flag_names(example, RCFG), "--ip or --dns-name is required: {\"ipResource\": {\"ipAddress\": ...}}");
        assert_eq!(
            flag_names("name \"vpcId\" is invalid; cidrBlock overlaps", "/v1/subnets"),
            "name \"vpcId\" is invalid; --cidr-block overlaps"
        );
        assert_eq!(flag_names("principals lists acct-1 twice", "/v1/resourceshares"), "--principal lists acct-1 twice");
        assert_eq!(flag_names("a principal or vpc-id", "/v1/resourceshares"), "a principal or vpc-id");
        // The same field is a different flag on another route.
        assert_eq!(flag_names("domainName: bad", "/v1/domainverifications"), "--domain-name: bad");
        assert_eq!(flag_names("domainName: bad", RCFG), "--dns-name: bad");
        const NFN: &str = "/v1/connectionnotifications/vpce-nfn-0123456789abcdef0";
        assert_eq!(
            flag_names("url: 127.0.0.1 is a loopback address", NFN),
            "--webhook-url: 127.0.0.1 is a loopback address"
        );
        assert_eq!(flag_names("connectionEvents lists Accept twice", NFN), "--event lists Accept twice");
        assert_eq!(flag_names("ipAddressType is bad", "/v1/resourcegateways"), "--ip-address-type is bad");
        assert_eq!(flag_names("ipAddressType is bad", RCFG), "--dns-ip-address-type is bad");

        let err = at_the_cli(RCFG)(ClientError::Api {
            status: 422,
            code: Some("InvalidPortRange".into()),
            message: "portRanges is empty".into(),
        });
        assert_eq!(err.to_string(), "--port-range is empty (HTTP 422 InvalidPortRange)");
    }

    #[test]
    fn deletes_with_an_empty_answer_say_what_was_deleted() {
        assert_eq!(
            hints(&ApiRequest::at(&trellis_api::vpcs::DELETE, "vpc-1"), &Value::Null, "https://h:1", "trellis"),
            "Deleted vpc-1.\n"
        );
    }

    #[test]
    fn secrets_shown_once_get_a_hint() {
        let req = ApiRequest::send(&trellis_api::agents::CREATE_TOKEN, &Default::default());
        let hint = hints(&req, &json!({"token": "trellis1.x"}), "https://h:1", "/opt/trellis");
        assert!(
            hint.contains(
                "TRELLIS_JOIN_TOKEN=trellis1.x /opt/trellis agent --control-plane https://h:1 --state-dir DIR"
            ),
            "the token goes in the environment, not in a flag `ps` shows: {hint}"
        );
        assert!(!hint.contains("--join-token"), "{hint}");
        let req = ApiRequest::send(&trellis_api::accounts::CREATE, &Default::default());
        assert!(hints(&req, &json!({"apiKey": "k"}), "https://h:1", "trellis").contains("shown once"));
    }
}
