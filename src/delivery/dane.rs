//! DANE for SMTP (RFC 7672): which TLSA records an SMTP client may use, and the certificate check
//! they stand for. DANE-EE(3) records pin the server's own certificate or key: no name or date check
//! (§3.1.1). DANE-TA(2) records name a trust anchor the server presents in its chain: the chain must
//! lead from it to a certificate valid today for the MX host name (§3.1.2). PKIX-TA(0) and PKIX-EE(1)
//! are unusable for SMTP (§3.1.3), as are unknown selectors and matching types, and digests of the
//! wrong length (RFC 7671 §5.1).

use std::sync::Arc;

use hickory_resolver::proto::rr::rdata::TLSA;
use hickory_resolver::proto::rr::rdata::tlsa::{CertUsage, Matching, Selector};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, RootCertStore};
use sha2::{Digest, Sha256, Sha512};

/// The records of `records` that DANE for SMTP can use.
pub fn usable(records: &[TLSA]) -> Vec<TLSA> {
    records
        .iter()
        .filter(|r| matches!(r.cert_usage, CertUsage::DaneTa | CertUsage::DaneEe))
        .filter(|r| matches!(r.selector, Selector::Full | Selector::Spki))
        .filter(|r| match r.matching {
            Matching::Raw => !r.cert_data.is_empty(),
            Matching::Sha256 => r.cert_data.len() == 32,
            Matching::Sha512 => r.cert_data.len() == 64,
            _ => false,
        })
        .cloned()
        .collect()
}

/// Whether `record` matches `cert` (its selector picks the whole certificate or its public key).
fn matches(record: &TLSA, cert: &CertificateDer<'_>) -> bool {
    let spki;
    let selected: &[u8] = match record.selector {
        Selector::Full => cert.as_ref(),
        Selector::Spki => match x509_parser::parse_x509_certificate(cert.as_ref()) {
            Ok((_, parsed)) => {
                spki = parsed.tbs_certificate.subject_pki.raw.to_vec();
                &spki
            }
            Err(_) => return false,
        },
        _ => return false,
    };
    match record.matching {
        Matching::Raw => selected == record.cert_data.as_slice(),
        Matching::Sha256 => Sha256::digest(selected).as_slice() == record.cert_data.as_slice(),
        Matching::Sha512 => Sha512::digest(selected).as_slice() == record.cert_data.as_slice(),
        _ => false,
    }
}

/// Checks the server's chain against the usable `records` (see the module text). `server_name`
/// is the MX host name, the TLSA base domain (RFC 7672 §3.2.2).
pub fn verify(
    records: &[TLSA],
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    server_name: &ServerName<'_>,
    now: UnixTime,
    provider: &Arc<CryptoProvider>,
) -> Result<(), rustls::Error> {
    let of = |usage: CertUsage| records.iter().filter(move |r| r.cert_usage == usage);
    if of(CertUsage::DaneEe).any(|r| matches(r, end_entity)) {
        return Ok(());
    }
    let mut chain_error = None;
    for anchor in intermediates {
        if !of(CertUsage::DaneTa).any(|r| matches(r, anchor)) {
            continue;
        }
        let mut roots = RootCertStore::empty();
        if roots.add(anchor.clone().into_owned()).is_err() {
            continue;
        }
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        match verifier.verify_server_cert(end_entity, intermediates, server_name, &[], now) {
            Ok(_) => return Ok(()),
            Err(e) => chain_error = Some(e),
        }
    }
    Err(chain_error.unwrap_or(rustls::Error::InvalidCertificate(
        CertificateError::ApplicationVerificationFailure,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, PublicKeyData};

    fn tlsa(usage: CertUsage, selector: Selector, matching: Matching, data: Vec<u8>) -> TLSA {
        TLSA::new(usage, selector, matching, data)
    }

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    struct Pki {
        ca: CertificateDer<'static>,
        leaf: CertificateDer<'static>,
        leaf_spki: Vec<u8>,
    }

    /// A CA and a leaf it issued for `names`.
    fn pki(names: &[&str]) -> Pki {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let leaf = CertificateParams::new(names)
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        Pki {
            ca: ca.der().clone(),
            leaf: leaf.der().clone(),
            leaf_spki: leaf_key.subject_public_key_info(),
        }
    }

    fn check(records: &[TLSA], pki: &Pki, chain: &[CertificateDer<'static>], name: &str) -> bool {
        let name = ServerName::try_from(name.to_string()).unwrap();
        verify(
            &usable(records),
            &pki.leaf,
            chain,
            &name,
            UnixTime::now(),
            &provider(),
        )
        .is_ok()
    }

    #[test]
    fn dane_ee_matches_the_certificate_or_its_key_by_any_digest_and_ignores_the_name() {
        let pki = pki(&["mx.example"]);
        let cert = pki.leaf.as_ref().to_vec();
        let spki = pki.leaf_spki.clone();
        for record in [
            tlsa(
                CertUsage::DaneEe,
                Selector::Spki,
                Matching::Sha256,
                Sha256::digest(&spki).to_vec(),
            ),
            tlsa(
                CertUsage::DaneEe,
                Selector::Spki,
                Matching::Sha512,
                Sha512::digest(&spki).to_vec(),
            ),
            tlsa(
                CertUsage::DaneEe,
                Selector::Spki,
                Matching::Raw,
                spki.clone(),
            ),
            tlsa(
                CertUsage::DaneEe,
                Selector::Full,
                Matching::Sha256,
                Sha256::digest(&cert).to_vec(),
            ),
            tlsa(
                CertUsage::DaneEe,
                Selector::Full,
                Matching::Raw,
                cert.clone(),
            ),
        ] {
            assert!(
                check(std::slice::from_ref(&record), &pki, &[], "other.example"),
                "{record:?}"
            );
        }
    }

    #[test]
    fn a_certificate_no_record_matches_is_refused() {
        let pki = pki(&["mx.example"]);
        let other = self::pki(&["mx.example"]);
        let wrong = Sha256::digest(&other.leaf_spki).to_vec();
        let records = [tlsa(
            CertUsage::DaneEe,
            Selector::Spki,
            Matching::Sha256,
            wrong,
        )];
        assert!(!check(&records, &pki, &[], "mx.example"));
        assert!(
            !check(&[], &pki, &[], "mx.example"),
            "no usable record: nothing matches"
        );
    }

    #[test]
    fn pkix_usages_and_malformed_records_are_unusable() {
        let pki = pki(&["mx.example"]);
        let digest = Sha256::digest(&pki.leaf_spki).to_vec();
        let records = [
            tlsa(
                CertUsage::PkixEe,
                Selector::Spki,
                Matching::Sha256,
                digest.clone(),
            ),
            tlsa(
                CertUsage::PkixTa,
                Selector::Spki,
                Matching::Sha256,
                digest.clone(),
            ),
            tlsa(
                CertUsage::DaneEe,
                Selector::Spki,
                Matching::Sha512,
                digest.clone(),
            ),
            tlsa(
                CertUsage::DaneEe,
                Selector::Spki,
                Matching::Unassigned(7),
                digest.clone(),
            ),
        ];
        assert!(usable(&records).is_empty());
        assert!(!check(&records, &pki, &[], "mx.example"));
        let mut with_good = records.to_vec();
        with_good.push(tlsa(
            CertUsage::DaneEe,
            Selector::Spki,
            Matching::Sha256,
            digest,
        ));
        assert_eq!(usable(&with_good).len(), 1);
    }

    #[test]
    fn dane_ta_needs_the_anchor_in_the_chain_and_a_leaf_valid_for_the_mx_name() {
        let pki = pki(&["mx.example"]);
        let ca_digest = Sha256::digest(pki.ca.as_ref()).to_vec();
        let records = [tlsa(
            CertUsage::DaneTa,
            Selector::Full,
            Matching::Sha256,
            ca_digest,
        )];
        assert!(check(
            &records,
            &pki,
            std::slice::from_ref(&pki.ca),
            "mx.example"
        ));
        assert!(
            !check(
                &records,
                &pki,
                std::slice::from_ref(&pki.ca),
                "other.example"
            ),
            "the name is checked for DANE-TA"
        );
        assert!(
            !check(&records, &pki, &[], "mx.example"),
            "the anchor must be presented"
        );
        // A leaf from another CA, presented with the pinned CA, does not chain to it.
        let other = self::pki(&["mx.example"]);
        let name = ServerName::try_from("mx.example").unwrap();
        let forged = verify(
            &usable(&records),
            &other.leaf,
            std::slice::from_ref(&pki.ca),
            &name,
            UnixTime::now(),
            &provider(),
        );
        assert!(forged.is_err());
        // DANE-TA does not pin the leaf itself.
        let leaf_digest = Sha256::digest(pki.leaf.as_ref()).to_vec();
        let as_ta = [tlsa(
            CertUsage::DaneTa,
            Selector::Full,
            Matching::Sha256,
            leaf_digest,
        )];
        assert!(!check(
            &as_ta,
            &pki,
            std::slice::from_ref(&pki.leaf),
            "mx.example"
        ));
    }
}
