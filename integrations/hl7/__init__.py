"""HL7 v2 over MLLP: signed reports in as ORU^R01, answered with ACKs (see README.md there)."""
