//! Pure planning of a VPC endpoint: zone overlap with the gateway, DNS names,
//! and one pool address per (resource, subnet).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use crate::ids::{ResourceConfigurationId, SubnetId, VpcEndpointId, VpcEndpointServiceId};
use crate::objects::{DnsEntry, ResourceConfiguration, Subnet};

/// DNS name of one resource of an endpoint: `<vpce>.<rcfg>.<region>.trellis.internal`.
pub fn endpoint_dns_name(endpoint: &VpcEndpointId, resource: &ResourceConfigurationId, region: &str) -> String {
    format!("{endpoint}.{resource}.{region}.trellis.internal")
}

/// The regional DNS name of an interface endpoint (all its addresses):
/// `<vpce>.<vpce-svc>.<region>.trellis.internal`.
pub fn interface_regional_name(endpoint: &VpcEndpointId, service: &VpcEndpointServiceId, region: &str) -> String {
    format!("{endpoint}.{service}.{region}.trellis.internal")
}

/// The zonal DNS name of an interface endpoint (its address in `zone`):
/// `<vpce>-<zone>.<vpce-svc>.<region>.trellis.internal`.
pub fn interface_zonal_name(
    endpoint: &VpcEndpointId,
    zone: &str,
    service: &VpcEndpointServiceId,
    region: &str,
) -> String {
    format!("{endpoint}-{zone}.{service}.{region}.trellis.internal")
}

/// The DNS entries of an interface endpoint in `subnets`: one address per
/// subnet, named by the regional name (every subnet's entry) and the subnet's zonal name.
pub fn plan_interface_entries(
    endpoint: &VpcEndpointId,
    service: &VpcEndpointServiceId,
    region: &str,
    subnets: &[Subnet],
    pools: &mut Pools,
) -> Result<Vec<DnsEntry>, PlacementError> {
    let mut entries = Vec::new();
    for subnet in subnets {
        let ip = IpAddr::V4(pools.allocate(subnet)?);
        for dns_name in [
            interface_regional_name(endpoint, service, region),
            interface_zonal_name(endpoint, &subnet.zone, service, region),
        ] {
            entries.push(DnsEntry {
                resource_configuration_id: None,
                dns_name,
                ip_addresses: vec![ip],
                subnet_id: subnet.id.clone(),
            });
        }
    }
    Ok(entries)
}

/// Why an endpoint cannot be placed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error(
        "the endpoint's subnets are in zones [{endpoint_zones}] but the resource gateway is in zones \
         [{gateway_zones}]; put the endpoint in at least one subnet of a gateway zone"
    )]
    NoCommonZone { endpoint_zones: String, gateway_zones: String },
    #[error("subnet {subnet_id} has no free address left in its pool {cidr}; use a larger cidrBlock or another subnet")]
    PoolExhausted { subnet_id: SubnetId, cidr: String },
}

fn zone_list<'a>(subnets: impl Iterator<Item = &'a Subnet>) -> String {
    let zones: BTreeSet<&str> = subnets.map(|s| s.zone.as_str()).collect();
    zones.into_iter().collect::<Vec<_>>().join(", ")
}

/// The endpoint's zones must overlap the gateway's zones.
pub fn check_zone_overlap(endpoint_subnets: &[Subnet], gateway_subnets: &[Subnet]) -> Result<(), PlacementError> {
    let overlap = endpoint_subnets.iter().any(|e| gateway_subnets.iter().any(|g| g.zone == e.zone));
    if overlap {
        Ok(())
    } else {
        Err(PlacementError::NoCommonZone {
            endpoint_zones: zone_list(endpoint_subnets.iter()),
            gateway_zones: zone_list(gateway_subnets.iter()),
        })
    }
}

/// Free addresses of a set of subnets, as the allocation goes.
#[derive(Clone, Debug, Default)]
pub struct Pools {
    used: BTreeMap<SubnetId, BTreeSet<Ipv4Addr>>,
}

impl Pools {
    /// Pools with these addresses already taken.
    pub fn new(used: impl IntoIterator<Item = (SubnetId, IpAddr)>) -> Self {
        let mut pools = Self::default();
        for (subnet, ip) in used {
            if let IpAddr::V4(v4) = ip {
                pools.used.entry(subnet).or_default().insert(v4);
            }
        }
        pools
    }

    /// Takes the first free address of `subnet`'s pool.
    pub fn allocate(&mut self, subnet: &Subnet) -> Result<Ipv4Addr, PlacementError> {
        let used = self.used.entry(subnet.id.clone()).or_default();
        let ip = subnet.cidr_block.allocate(used).ok_or_else(|| PlacementError::PoolExhausted {
            subnet_id: subnet.id.clone(),
            cidr: subnet.cidr_block.to_string(),
        })?;
        used.insert(ip);
        Ok(ip)
    }
}

/// The DNS entries of `resources` (SINGLE or CHILD configurations) for an
/// endpoint in `subnets`: per (resource, subnet) one address and the
/// generated name, plus the custom domain name when private DNS is on.
pub fn plan_dns_entries(
    endpoint: &VpcEndpointId,
    region: &str,
    resources: &[&ResourceConfiguration],
    subnets: &[Subnet],
    private_dns_enabled: bool,
    pools: &mut Pools,
) -> Result<Vec<DnsEntry>, PlacementError> {
    let mut entries = Vec::new();
    for resource in resources {
        for subnet in subnets {
            let ip = IpAddr::V4(pools.allocate(subnet)?);
            entries.push(DnsEntry {
                resource_configuration_id: Some(resource.id.clone()),
                dns_name: endpoint_dns_name(endpoint, &resource.id, region),
                ip_addresses: vec![ip],
                subnet_id: subnet.id.clone(),
            });
            if let (true, Some(custom)) = (private_dns_enabled, &resource.custom_domain_name) {
                entries.push(DnsEntry {
                    resource_configuration_id: Some(resource.id.clone()),
                    dns_name: custom.clone(),
                    ip_addresses: vec![ip],
                    subnet_id: subnet.id.clone(),
                });
            }
        }
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::*;
    use crate::objects::*;
    use crate::pool::AddressPool;
    use crate::status::ResourceStatus;
    use crate::time::Timestamp;

    fn subnet(n: u8, zone: &str, cidr: &str) -> Subnet {
        Subnet::new(
            SubnetId::generate(&[n; 16]),
            AccountId::generate(&[1; 16]),
            VpcId::generate(&[1; 16]),
            zone.into(),
            AddressPool::parse(cidr).unwrap(),
            None,
            "local",
            Timestamp::from_unix_seconds(0),
        )
    }

    fn resource(n: u8, custom: Option<&str>) -> ResourceConfiguration {
        ResourceConfiguration {
            id: ResourceConfigurationId::generate(&[n; 16]),
            arn: String::new(),
            account_id: AccountId::generate(&[1; 16]),
            name: "db".into(),
            config_type: ConfigurationType::Single,
            status: ResourceStatus::Active,
            resource_gateway_id: ResourceGatewayId::generate(&[1; 16]),
            resource_configuration_group_id: None,
            resource_configuration_definition: None,
            port_ranges: vec![],
            protocol: Protocol::Tcp,
            custom_domain_name: custom.map(String::from),
            proxy_protocol: Default::default(),
            per_consumer_limits: None,
            created_at: Timestamp::from_unix_seconds(0),
        }
    }

    #[test]
    fn an_interface_endpoint_has_a_regional_name_everywhere_and_a_zonal_name_per_subnet() {
        let ep = VpcEndpointId::generate(&[5; 16]);
        let svc = VpcEndpointServiceId::generate(&[6; 16]);
        let subnets = [subnet(1, "z1", "10.0.9.0/24"), subnet(2, "z2", "10.0.10.0/24")];
        let entries = plan_interface_entries(&ep, &svc, "local", &subnets, &mut Pools::default()).unwrap();
        let regional = interface_regional_name(&ep, &svc, "local");
        assert_eq!(regional, format!("{ep}.{svc}.local.trellis.internal"));
        let names: Vec<(&str, String)> =
            entries.iter().map(|e| (e.dns_name.as_str(), e.ip_addresses[0].to_string())).collect();
        assert_eq!(
            names,
            [
                (regional.as_str(), "10.0.9.1".to_string()),
                (format!("{ep}-z1.{svc}.local.trellis.internal").as_str(), "10.0.9.1".to_string()),
                (regional.as_str(), "10.0.10.1".to_string()),
                (format!("{ep}-z2.{svc}.local.trellis.internal").as_str(), "10.0.10.1".to_string()),
            ]
        );
        assert!(entries.iter().all(|e| e.resource_configuration_id.is_none()));
    }

    #[test]
    fn dns_names_follow_the_documented_pattern() {
        let e = VpcEndpointId::parse("vpce-0123456789abcdef0").unwrap();
        let r = ResourceConfigurationId::parse("rcfg-0123456789abcdef0").unwrap();
        assert_eq!(
            endpoint_dns_name(&e, &r, "local"),
            "vpce-0123456789abcdef0.rcfg-0123456789abcdef0.local.trellis.internal"
        );
    }

    #[test]
    fn zones_must_overlap_with_the_gateway() {
        let a = subnet(1, "z1", "10.0.1.0/24");
        let b = subnet(2, "z2", "10.0.2.0/24");
        let c = subnet(3, "z1", "10.9.1.0/24");
        assert!(check_zone_overlap(&[a.clone(), b.clone()], &[c]).is_ok());
        let err = check_zone_overlap(&[b], &[a]).unwrap_err();
        assert!(err.to_string().contains("[z2]") && err.to_string().contains("[z1]"), "{err}");
    }

    #[test]
    fn each_resource_gets_one_address_per_subnet() {
        let subnets = [subnet(1, "z1", "10.0.1.0/28"), subnet(2, "z2", "10.0.2.0/28")];
        let r1 = resource(1, Some("db.example.com"));
        let r2 = resource(2, None);
        let e = VpcEndpointId::generate(&[7; 16]);
        let mut pools = Pools::new([(subnets[0].id.clone(), "10.0.1.1".parse().unwrap())]);
        let entries = plan_dns_entries(&e, "local", &[&r1, &r2], &subnets, true, &mut pools).unwrap();
        let generated: Vec<_> = entries.iter().filter(|e| e.dns_name.ends_with(".trellis.internal")).collect();
        assert_eq!(generated.len(), 4);
        let ips: BTreeSet<_> = generated.iter().map(|e| e.ip_addresses[0]).collect();
        assert_eq!(ips.len(), 4, "addresses are distinct");
        assert_eq!(generated[0].ip_addresses[0], "10.0.1.2".parse::<IpAddr>().unwrap(), "skips the used .1");
        let custom: Vec<_> = entries.iter().filter(|e| e.dns_name == "db.example.com").collect();
        assert_eq!(custom.len(), 2, "custom name in each subnet for r1 only");
        let without = plan_dns_entries(&e, "local", &[&r1], &subnets, false, &mut Pools::default()).unwrap();
        assert_eq!(without.len(), 2);
    }

    #[test]
    fn an_exhausted_pool_fails_with_the_subnet_named() {
        let s = subnet(1, "z1", "10.0.1.0/28");
        let e = VpcEndpointId::generate(&[7; 16]);
        let used: Vec<_> = (1..=14).map(|i| (s.id.clone(), IpAddr::V4(Ipv4Addr::new(10, 0, 1, i)))).collect();
        let err = plan_dns_entries(&e, "local", &[&resource(1, None)], &[s], false, &mut Pools::new(used)).unwrap_err();
        assert!(matches!(err, PlacementError::PoolExhausted { .. }));
    }
}
