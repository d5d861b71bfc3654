-- Whether a message is in the Kafka topic of direct messages (issue 12): a client's retry of a
-- produced message is acked without producing it twice. A constant default: no table rewrite.
ALTER TABLE switchboard_messages ADD COLUMN produced boolean NOT NULL DEFAULT false;
