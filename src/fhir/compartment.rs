//! The R4 Patient compartment (`CompartmentDefinition/patient`), shipped as data, with the search
//! parameter the proxy uses to select a batch of patients' resources of each type. One addition:
//! `Device` (by its `patient` parameter), which US Core Group exports expect. Here, below `config`,
//! because the configuration checks types against it (`export.supporting_types`); where each
//! type references its patient is `export::compartment`'s generated table.

/// The R4 Patient compartment: each member type and the search parameter that selects the
/// resources of a batch of patients (`patient` wherever R4 defines it; the compartment's own
/// parameter otherwise). `Patient` itself is selected by `_id`.
pub const PATIENT_COMPARTMENT: &[(&str, &str)] = &[
    ("Account", "patient"),
    ("AdverseEvent", "subject"),
    ("AllergyIntolerance", "patient"),
    ("Appointment", "patient"),
    ("AppointmentResponse", "patient"),
    ("AuditEvent", "patient"),
    ("Basic", "patient"),
    ("BodyStructure", "patient"),
    ("CarePlan", "patient"),
    ("CareTeam", "patient"),
    ("ChargeItem", "patient"),
    ("Claim", "patient"),
    ("ClaimResponse", "patient"),
    ("ClinicalImpression", "patient"),
    ("Communication", "patient"),
    ("CommunicationRequest", "patient"),
    ("Composition", "patient"),
    ("Condition", "patient"),
    ("Consent", "patient"),
    ("Coverage", "patient"),
    ("CoverageEligibilityRequest", "patient"),
    ("CoverageEligibilityResponse", "patient"),
    ("DetectedIssue", "patient"),
    // Not in the R4 compartment definition, but a Device names its patient and US Core /
    // (g)(10) Group exports expect implantable devices (SPEC A5.2: MAY include, SHOULD document).
    ("Device", "patient"),
    ("DeviceRequest", "patient"),
    ("DeviceUseStatement", "patient"),
    ("DiagnosticReport", "patient"),
    ("DocumentManifest", "patient"),
    ("DocumentReference", "patient"),
    ("Encounter", "patient"),
    ("EnrollmentRequest", "patient"),
    ("EpisodeOfCare", "patient"),
    ("ExplanationOfBenefit", "patient"),
    ("FamilyMemberHistory", "patient"),
    ("Flag", "patient"),
    ("Goal", "patient"),
    ("Group", "member"),
    ("ImagingStudy", "patient"),
    ("Immunization", "patient"),
    ("ImmunizationEvaluation", "patient"),
    ("ImmunizationRecommendation", "patient"),
    ("Invoice", "patient"),
    ("List", "patient"),
    ("MeasureReport", "patient"),
    ("Media", "patient"),
    ("MedicationAdministration", "patient"),
    ("MedicationDispense", "patient"),
    ("MedicationRequest", "patient"),
    ("MedicationStatement", "patient"),
    ("MolecularSequence", "patient"),
    ("NutritionOrder", "patient"),
    ("Observation", "patient"),
    ("Patient", "_id"),
    ("Person", "patient"),
    ("Procedure", "patient"),
    ("Provenance", "patient"),
    ("QuestionnaireResponse", "patient"),
    ("RelatedPerson", "patient"),
    ("RequestGroup", "patient"),
    ("ResearchSubject", "patient"),
    ("RiskAssessment", "patient"),
    ("Schedule", "actor"),
    ("ServiceRequest", "patient"),
    ("Specimen", "patient"),
    ("SupplyDelivery", "patient"),
    ("SupplyRequest", "subject"),
    ("VisionPrescription", "patient"),
];

/// The search parameter selecting `resource_type` by patient, when the type is in the compartment.
pub fn compartment_param(resource_type: &str) -> Option<&'static str> {
    PATIENT_COMPARTMENT
        .binary_search_by(|(t, _)| t.cmp(&resource_type))
        .ok()
        .map(|i| PATIENT_COMPARTMENT[i].1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::resource_types::is_resource_type;

    #[test]
    fn compartment_is_sorted_and_names_r4_types() {
        assert!(PATIENT_COMPARTMENT.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(PATIENT_COMPARTMENT.iter().all(|(t, _)| is_resource_type(t)));
    }

    #[test]
    fn compartment_lookup() {
        assert_eq!(compartment_param("Observation"), Some("patient"));
        assert_eq!(compartment_param("Patient"), Some("_id"));
        assert_eq!(compartment_param("Practitioner"), None);
        assert!(is_resource_type("Observation") && !is_resource_type("MissingType"));
    }
}
