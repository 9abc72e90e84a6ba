DROP TABLE metering.service_tokens;
